"""Engine: the blocking facade over AsyncEngine, for scripts and notebooks — it runs the engine on
an event loop of its own, in a thread, and waits for each call."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

from eaas.config import EngineConfig
from eaas.engine.engine import AsyncEngine
from eaas.engine.outputs import RequestOutput
from eaas.engine.sampling import SamplingParams
from eaas.errors import RequestError

__all__ = ["Engine"]


class Engine:
    """Blocking facade: runs an AsyncEngine on its own event-loop thread."""

    def __init__(self, config: EngineConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eaas-engine",
                                        daemon=True)
        self._thread.start()
        self.engine = AsyncEngine(config)
        try:
            self._run(self.engine.start())
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts (all run concurrently)."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)  # type: ignore[list-item]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(batch)
        if len(plist) != len(batch):
            raise RequestError(f"got {len(plist)} SamplingParams for {len(batch)} prompts")

        async def one(p: Any, sp: SamplingParams | None) -> RequestOutput:
            last = None
            async for last in self.engine.generate(p, sp):
                pass
            assert last is not None
            return last

        async def run_all() -> list[RequestOutput]:
            return list(await asyncio.gather(*(one(p, sp) for p, sp in zip(batch, plist))))

        return self._run(run_all())

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._run(self.engine.aclose())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
