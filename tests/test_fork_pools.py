"""A process forked after using the database (django-q2 forks its workers from the sentinel,
which runs the scheduler) must not share the parent's pooled connections."""

from __future__ import annotations

import multiprocessing

import pytest
from django.db import connection, connections

pytestmark = pytest.mark.django_db(transaction=True)


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _child(queue) -> None:
    queue.put(_backend_pid())


def test_a_forked_process_gets_connections_of_its_own():
    parent_before = _backend_pid()
    connections.close_all()  # what django-q2 does before it forks: the pool keeps them open
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    child_pid = queue.get(timeout=20)
    child.join(20)
    assert child.exitcode == 0
    parent_after = _backend_pid()
    # Without closing the pools at fork, the child takes the parent's idle connection from the
    # copied pool: both then talk to one PostgreSQL backend over one socket.
    assert child_pid not in (parent_before, parent_after)
