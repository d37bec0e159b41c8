"""Reports for people (text tables, Markdown, HTML) and JSON for machines."""
