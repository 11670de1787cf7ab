"""The gate every generation passes: ``concurrency`` run, ``queue`` wait, the rest are refused at once.

Waiting happens on the event loop, not in threads, so a full queue costs no thread and a refusal costs
microseconds. Work runs in a pool of exactly ``concurrency`` threads. A caller that goes away (its HTTP
client disconnected, its Gradio session closed) cancels its wait; if its job is already running, the
job's ``cancel`` event is set and the sampler stops at its next step (`Cancelled`).
"""
import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

from .limits import Busy


class Cancelled(Exception):
    """Raised inside a job, between sampling steps, once nobody waits for its result."""


def stop_when(cancel, callback=None):
    """A sampler callback that raises `Cancelled` once ``cancel`` is set, and otherwise calls ``callback``."""
    def step(i, tokens):
        if cancel.is_set():
            raise Cancelled
        if callback is not None:
            callback(i, tokens)
    return step


class Gate:
    def __init__(self, concurrency=1, queue=16, wait=120.0):
        self.capacity, self.wait = concurrency + queue, wait
        self.inside = 0                                   # running + waiting, read by /v1/health
        self.slots = asyncio.Semaphore(concurrency)       # bound to the server's loop on first use
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix='paella-job')

    async def run(self, job):
        """``job(cancel)`` in a worker thread once a slot is free; its result. `Busy` if the queue is full
        or the wait too long. If this coroutine is cancelled, ``cancel`` is set and the slot is released
        only once the job has really stopped (so the next job never shares the CPU with a dead one)."""
        if self.inside >= self.capacity:
            raise Busy(f"the server is busy ({self.inside} requests running or waiting); try again shortly")
        self.inside += 1
        try:
            try:
                await asyncio.wait_for(self.slots.acquire(), self.wait)
            except asyncio.TimeoutError:
                raise Busy(f"no free slot after waiting {self.wait:g} s; try again shortly") from None
            if asyncio.current_task().cancelling():
                # before Python 3.12, wait_for returns the slot and drops a cancel that came in the same step
                self.slots.release()
                raise asyncio.CancelledError
            try:
                cancel = threading.Event()
                # in the caller's context: Gradio's progress bar finds its event through context variables
                context = contextvars.copy_context()
                future = asyncio.get_running_loop().run_in_executor(self.pool, context.run, job, cancel)
                try:
                    return await asyncio.shield(future)
                except asyncio.CancelledError:
                    cancel.set()
                    await asyncio.wait([future])
                    if not future.cancelled():
                        future.exception()                # retrieved: its `Cancelled` is expected
                    raise
            finally:
                self.slots.release()
        finally:
            self.inside -= 1
