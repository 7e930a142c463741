"""The scripts' shared wrapper: what it keeps off the user's terminal and what it lets through."""

import asyncio
import gc
import logging

import pytest

from gan import cli


@pytest.fixture
def asyncio_records():
  """What asyncio logs through a handler with the scripts' filter."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  handler.addFilter(cli._Orphans())
  logger = logging.getLogger("asyncio")
  logger.addHandler(handler)
  yield records
  logger.removeHandler(handler)


def test_failed_writes_nobody_waited_for_are_not_reported_again(asyncio_records):
  async def save():
    loop = asyncio.get_running_loop()
    for _ in range(3):  # as TensorStore fails them: set from outside, no Python traceback
      loop.create_future().set_exception(ValueError("OUT_OF_RANGE: Failed writing"))

  loop = asyncio.new_event_loop()
  loop.run_until_complete(save())
  loop.close()
  gc.collect()
  assert asyncio_records == []


def test_other_asyncio_errors_are_still_reported(asyncio_records):
  loop = asyncio.new_event_loop()
  loop.call_exception_handler({"message": "callback failed", "exception": OSError("disk")})
  loop.close()
  (record,) = asyncio_records
  assert "callback failed" in record.getMessage()
