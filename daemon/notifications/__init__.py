"""Completion notifications: a finished job's webhook, from the record the supervisor writes to the POSTs that
deliver it. A room of its own beside the supervisor: its own thread, its own libcurl loop, its own retries
and signing; it shares only the spool with the rest (imports the engine's transfer rules, spool/ and config/).

    outbox.py     Outbox: the supervisor's side: a finished job's notification, durable before its status
    delivery.py   Deliveries: the thread that POSTs them, signed (Standard Webhooks), with retries

The words: a *notification* is one finished job's webhook (spool/records.py, Notification); each POST of it
is an *attempt*, all with one webhook-id; it is *delivered* (a 2xx answer) or *given up*.
"""
