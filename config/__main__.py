"""``python -m config``: print the settings table README.md holds."""
from config import markdown_table

print(markdown_table())
