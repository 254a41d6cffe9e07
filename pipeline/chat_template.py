"""Chat templates: compile and render them (jinja2's immutable sandbox with the settings
transformers uses, so output matches), and render templates that are not trusted in worker
processes with bounds.

A model's chat template is code that a serving peer sends (``serve.tokenizer``). The sandbox
stops it from touching the gateway's objects, but not from looping for hours or building a
gigabyte string. So ``TemplateRenderer`` renders in worker processes (``python -m
pipeline.chat_template``, JSON lines over stdin/stdout; pure jinja2, no torch) under three bounds:

- time: each render has a deadline; on expiry the worker is killed (a thread could not be
  stopped) and replaced on the next use, and the template's SHA-256 is remembered so later
  requests with it fail at once instead of burning a worker each;
- output: rendering stops once the text passes ``max_output`` characters (``render`` pulls the
  output piece by piece from ``Template.generate``);
- memory: the worker's address space is capped (``RLIMIT_AS``), so one huge expression ends in
  ``MemoryError`` in the worker, not in the machine's memory.

The event loop only waits on a pipe. ``workers`` processes render at once; more requests queue.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
from collections import OrderedDict
from typing import Any

from peer.errors import LowbandError

log = logging.getLogger("lowband.pipeline.chat_template")


class TemplateError(ValueError):
    """The template refused these messages (its ``raise_exception``) or is not valid jinja."""


class TemplateBoundExceeded(LowbandError):
    """Rendering ran past its time, output or memory bound (or its worker died)."""


def compile_template(source: str):
    """``source`` compiled in transformers' chat-template environment (immutable sandbox,
    ``trim_blocks``, ``lstrip_blocks``, a ``raise_exception`` global)."""
    from jinja2.exceptions import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise JinjaError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except Exception as e:  # a syntax error is the template's fault
        raise TemplateError(f"chat template does not compile: {e}") from e


def render(template, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, max_output: int | None = None) -> str:
    """Render compiled ``template``; ``TemplateBoundExceeded`` once the output passes
    ``max_output`` characters, ``TemplateError`` for any error the template raises."""
    pieces, size = [], 0
    try:
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token):
            size += len(piece)
            if max_output is not None and size > max_output:
                raise TemplateBoundExceeded(f"chat template output passed {max_output} characters")
            pieces.append(piece)
    except (TemplateBoundExceeded, MemoryError):
        raise
    except Exception as e:
        raise TemplateError(f"chat template failed: {e}") from e
    return "".join(pieces)


# ------------------------------------------------------------------------------- the worker
def _serve(memory_bytes: int) -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per stdout line."""
    if memory_bytes > 0:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    compiled: OrderedDict[str, Any] = OrderedDict()  # a few templates, most recent last
    for line in sys.stdin:
        try:
            req = json.loads(line)
            source = req["template"]
            if source not in compiled:
                compiled[source] = compile_template(source)
                if len(compiled) > 8:
                    compiled.popitem(last=False)
            compiled.move_to_end(source)
            reply = {"text": render(compiled[source], req["messages"], bos_token=req["bos_token"],
                                    eos_token=req["eos_token"], add_generation_prompt=req["add_generation_prompt"],
                                    max_output=req["max_output"])}
        except TemplateError as e:
            reply = {"error": str(e), "kind": "template"}
        except TemplateBoundExceeded as e:
            reply = {"error": str(e), "kind": "bound"}
        except MemoryError:
            compiled.clear()
            reply = {"error": "chat template exceeded the renderer's memory cap", "kind": "bound"}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": f"bad render request: {e}", "kind": "bound"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, memory_bytes: int, max_line: int) -> "_Worker":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline.chat_template", str(memory_bytes),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=max_line)
        return cls(proc)

    async def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise TemplateBoundExceeded("the chat-template worker died while rendering")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class TemplateRenderer:
    """Renders untrusted chat templates in bounded worker processes (module docstring)."""

    def __init__(self, *, timeout_s: float = 2.0, max_output: int = 1 << 20, memory_bytes: int = 1 << 30,
                 workers: int = 2):
        if timeout_s <= 0 or max_output < 1 or workers < 1:
            raise ValueError("template renderer bounds must be positive")
        self.timeout_s, self.max_output, self.memory_bytes = timeout_s, max_output, memory_bytes
        self.workers = workers
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self._failed: OrderedDict[str, str] = OrderedDict()  # template sha256 -> why (timeouts, worker deaths)

    async def render(self, template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                     add_generation_prompt: bool = True) -> str:
        digest = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
        if digest in self._failed:
            raise TemplateBoundExceeded(self._failed[digest])
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        request = {"template": template, "messages": messages, "bos_token": bos_token, "eos_token": eos_token,
                   "add_generation_prompt": add_generation_prompt, "max_output": self.max_output}
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start()
            keep = False
            try:
                reply = await asyncio.wait_for(worker.ask(request), self.timeout_s)
                keep = reply.get("kind") != "bound"  # after a MemoryError the worker starts afresh
            except asyncio.TimeoutError:
                self._remember(digest, f"chat template did not render within {self.timeout_s:g} s")
                raise TemplateBoundExceeded(self._failed[digest]) from None
            except (OSError, ValueError, TemplateBoundExceeded) as e:  # died, broken pipe, garbled line
                self._remember(digest, f"chat-template worker failed: {e}")
                raise TemplateBoundExceeded(self._failed[digest]) from e
            finally:
                if keep:
                    self._idle.append(worker)
                else:
                    worker.kill()
                    await worker.proc.wait()
        if "text" in reply:
            return reply["text"]
        if reply.get("kind") == "template":
            raise TemplateError(reply["error"])
        raise TemplateBoundExceeded(str(reply.get("error")))

    async def _start(self) -> _Worker:
        try:
            return await _Worker.start(self.memory_bytes, 8 * self.max_output + (1 << 16))
        except OSError as e:
            raise TemplateBoundExceeded(f"cannot start a chat-template worker: {e}") from e

    async def warm(self) -> None:
        """Start one worker ahead of the first chat (a worker takes ~0.1 s to start)."""
        if not self._idle:
            try:
                self._idle.append(await self._start())
            except TemplateBoundExceeded as e:  # chats will retry, and say why if it persists
                log.warning("%s", e)

    def _remember(self, digest: str, why: str) -> None:
        self._failed[digest] = why
        while len(self._failed) > 256:
            self._failed.popitem(last=False)
        log.warning("chat template %s refused: %s", digest[:12], why)

    async def aclose(self) -> None:
        for worker in self._idle:
            worker.kill()
        await asyncio.gather(*(w.proc.wait() for w in self._idle))
        self._idle.clear()


async def render_chat(renderer: TemplateRenderer, tokenizer, messages: list[dict], pinned: str | None = None) -> str:
    """``messages`` rendered for ``tokenizer``'s model (a ``pipeline.tokenizer.Tokenizer``, as its
    server sent it) with ``pinned`` if given, else the model's own template, in ``renderer``."""
    template = pinned or tokenizer.chat_template
    if not template:
        raise TemplateError("this model has no chat template; pin one with --chat-template FILE")
    return await renderer.render(template, messages, **tokenizer.special_tokens())


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
