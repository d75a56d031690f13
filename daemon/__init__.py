"""The Retail Pulse daemon: takes jobs from the spool and measures their images on a process pool."""
