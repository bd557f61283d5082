"""The datastore contract suite, run against each real engine."""

from __future__ import annotations

import psycopg
import pymysql
import pytest
import redis
from datastore_contract import DatastoreContract

from coffer.guest.datastores.mariadb import MariaDBDatastore
from coffer.guest.datastores.postgresql import PostgreSQLDatastore
from coffer.guest.datastores.redis import RedisDatastore

pytestmark = pytest.mark.integration


class TestMariaDB(DatastoreContract):
    plugin = MariaDBDatastore
    port = 3306
    address_prefix = "127.10.240"

    def can_login(
        self, address: str, user: str | None, password: str, database: str | None
    ) -> bool:
        try:
            conn = pymysql.connect(
                host=address,
                port=self.port,
                user=user,
                password=password,
                database=database,
                connect_timeout=5,
            )
        except pymysql.err.OperationalError:
            return False
        with conn, conn.cursor() as cur:
            if database:
                cur.execute("CREATE TABLE IF NOT EXISTS contract_t (id INT)")
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)


class TestPostgreSQL(DatastoreContract):
    plugin = PostgreSQLDatastore
    port = 5432
    address_prefix = "127.10.241"
    root_database = "postgres"

    def can_login(
        self, address: str, user: str | None, password: str, database: str | None
    ) -> bool:
        try:
            conn = psycopg.connect(
                host=address,
                port=self.port,
                user=user,
                password=password,
                dbname=database or "postgres",
                connect_timeout=5,
            )
        except psycopg.OperationalError:
            return False
        with conn:
            if database and database != "postgres":
                conn.execute("CREATE TABLE IF NOT EXISTS contract_t (id INT)")
            row = conn.execute("SELECT 1").fetchone()
            return row == (1,)


class TestRedis(DatastoreContract):
    plugin = RedisDatastore
    port = 6379
    address_prefix = "127.10.242"

    def can_login(
        self, address: str, user: str | None, password: str, database: str | None
    ) -> bool:
        client = redis.Redis(
            host=address, port=self.port, username=user, password=password, socket_timeout=5
        )
        try:
            client.set("contract:k", "v")
            return client.get("contract:k") == b"v"
        except (redis.AuthenticationError, redis.ResponseError, redis.ConnectionError):
            return False
        finally:
            client.close()
