"""Who is asking (principals, tokens) and what they may do (roles, access rules)."""
