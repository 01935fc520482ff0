"""The HTML pages for people: the form, job and batch pages, sign-in; their templates and static files."""
