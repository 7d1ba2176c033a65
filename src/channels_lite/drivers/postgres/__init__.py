"""The PostgreSQL driver (psycopg 3; ``pip install 'channels-lite[postgres]'``).

Importing this package does not import psycopg: the driver class can be registered and listed
everywhere, and only constructing it without the extra raises an error that says what to
install.
"""

from channels_lite.drivers.postgres.driver import PostgresDriver

__all__ = ["PostgresDriver"]
