"""The HTTP interface: thin routers over engine functions, problem+json errors."""
