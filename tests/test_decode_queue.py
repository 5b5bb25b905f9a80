"""The VAE decoder's queue: decodes in the scheduler policy's order, `concurrency` at a time, and its backlog."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from deployments.vae_decoder import Decoded, DecodeQueue, DecodeRequest


class RecordingDecoder:
    """Stands in for VaeDecoderCore: 1 ms per latent element, records the order; the first decode waits for `gate`
    so that the others queue up behind it."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()

    def decode(self, request: DecodeRequest, latents: torch.Tensor) -> Decoded:
        if not self.order:
            self.gate.wait(5)
        self.order.append(request.model)
        seconds = 1e-3 * latents.numel()
        time.sleep(seconds)
        return Decoded(request.model.encode(), None, 0.0, seconds, 0.0)


def request(name: str, elements: int, arrival: float) -> tuple[DecodeRequest, torch.Tensor]:
    return DecodeRequest(name, elements, "mp4", arrival_time=arrival), torch.zeros(1, elements)


async def _decode_all(policy: str, concurrency: int = 1) -> tuple[list[str], DecodeQueue]:
    decoder = RecordingDecoder()
    queue = DecodeQueue(decoder, policy, concurrency)
    first = asyncio.ensure_future(queue.decode(*request("first", 1, 0.0)))
    await asyncio.sleep(0.05)  # the first is decoding (held at the gate); the rest queue behind it
    rest = [asyncio.ensure_future(queue.decode(*request(n, e, a)))
            for n, e, a in (("long-early", 40, 1.0), ("short-late", 5, 3.0), ("mid", 20, 2.0))]
    await asyncio.sleep(0.05)
    assert len(queue) == 3
    decoder.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [r.media for r in results] == [b"first", b"long-early", b"short-late", b"mid"]
    assert all(r.queue_s >= 0 for r in results) and results[1].decode_s == pytest.approx(0.04)
    return decoder.order, queue


def test_srptf_decodes_the_smallest_first():
    order, _ = asyncio.run(_decode_all("srptf"))
    assert order == ["first", "short-late", "mid", "long-early"]


def test_fifo_decodes_by_arrival():
    order, _ = asyncio.run(_decode_all("fifo"))
    assert order == ["first", "long-early", "mid", "short-late"]


def test_backlog_counts_queued_elements_at_the_measured_rate():
    async def scenario() -> tuple[float, float, float]:
        decoder = RecordingDecoder()
        decoder.gate.set()
        queue = DecodeQueue(decoder, "fifo", concurrency=2)
        before = queue.backlog_seconds()  # nothing measured yet
        await queue.decode(*request("warm", 10, 0.0))  # 1 ms per element measured
        decoder.gate.clear()
        decoder.order.clear()  # the next decode waits at the gate
        pending = [asyncio.ensure_future(queue.decode(*request(f"r{i}", 100, i))) for i in range(3)]
        await asyncio.sleep(0.05)
        during = queue.backlog_seconds()
        decoder.gate.set()
        await asyncio.gather(*pending)
        return before, during, queue.backlog_seconds()

    before, during, after = asyncio.run(scenario())
    assert before == 0.0 and after == 0.0
    assert during == pytest.approx(3 * 100 * 1e-3 / 2, rel=0.2)  # 300 elements over 2 slots
