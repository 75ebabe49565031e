"""The only code that speaks SQL: tables, migrations, and the queries."""
