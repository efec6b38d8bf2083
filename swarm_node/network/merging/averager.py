"""hivemind's DecentralizedAverager, instrumented: bytes moved, hivemind's own failure signals, a chosen state.

`MergeAverager` changes nothing in the all-reduce. It adds three things:
- **Bytes.** Every tensor part this peer serializes (its contributions, and the averaged parts it returns as a
  reducer) counts as sent, every part it deserializes as received, including state downloads. The counters
  are shared memory written by the averager's child process, so the node reads them without a round trip.
  They count tensor payloads as encoded (protobuf `Tensor` messages), not libp2p framing.
- **Failure signals.** hivemind 1.1.12 can finish a round "successfully" after a peer died: the parts that
  peer should have averaged fall back to this peer's own values (`failed_size`), and senders that stopped
  mid-round are left out of the parts they did not send (`banned_senders`). Both are recorded per round.
- **A guarded reducer** (`GuardedAllReduceRunner`): as a reducer, every sender counts with weight 1 whatever
  weight its parts claim, and a sender whose part has another compression than this group's, or holds a
  non-finite value, is dropped from the round at once (hivemind would average it with the claimed weight).
- **State.** Peers that download this peer's state (`load_state_from_peers`) get what `state_fn` returns (the
  weights at the last verified merge), not the tensors being averaged right now.

Averagers are created with `start_in_main_thread`: hivemind requires the main thread and sets SIGINT to
"ignore" in the parent when it starts one; the previous handler is restored, so Ctrl-C keeps working.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import signal
import threading
from typing import Any, Callable, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.compression.quantization import Uniform8BitQuantization
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.averaging.partition import BannedException
import hivemind.averaging.allreduce as _allreduce_module
import hivemind.averaging.averager as _averager_module
from hivemind.proto import averaging_pb2
from hivemind.p2p import PeerID
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, azip
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming

log = logging.getLogger(__name__)


RPC_SERVICE = "SwarmMergeV1"  # service part of the averaging RPC names (protocols/PROTOCOL.md, merge section)


def make_compression(name: str) -> CompressionBase:
    """none, fp16 or 8bit (hivemind's uniform 8-bit, decodable thanks to hivemind_patch)."""
    return {"none": NoCompression, "fp16": Float16Compression, "8bit": Uniform8BitQuantization}[name]()


class Traffic:
    """Bytes sent and received by one averager process (shared memory, written by the child)."""

    def __init__(self):
        self.sent = mp.Value(ctypes.c_int64, 0)
        self.received = mp.Value(ctypes.c_int64, 0)

    @staticmethod
    def add(counter, n: int) -> None:
        with counter.get_lock():
            counter.value += n

    def totals(self) -> tuple[int, int]:
        return int(self.sent.value), int(self.received.value)


class CountingCompression(CompressionBase):
    """Wraps a compression; counts the bytes of every tensor part it encodes as sent."""

    def __init__(self, inner: CompressionBase, traffic: Traffic):
        self.inner, self.traffic = inner, traffic
        self.compression_type = inner.compression_type

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        out = self.inner.compress(tensor, info, allow_inplace)
        Traffic.add(self.traffic.sent, out.ByteSize())
        return out

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.inner.estimate_compression_ratio(info)


class _QuietNoGroup(logging.Filter):
    """hivemind logs a traceback when a step finds no group; for a node that is simply alone that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "could not find a group" not in str(record.exc_info[1] if record.exc_info else record.getMessage())


def _count_tensor_traffic(traffic: Traffic) -> None:
    """In the averager's child process: count every tensor part hivemind (de)serializes for averaging or state."""
    import hivemind.averaging.allreduce as allreduce
    import hivemind.averaging.averager as averager

    serialize, deserialize = allreduce.serialize_torch_tensor, allreduce.deserialize_torch_tensor

    def counted_serialize(*args, **kwargs):
        out = serialize(*args, **kwargs)
        Traffic.add(traffic.sent, out.ByteSize())
        return out

    def counted_deserialize(message):
        Traffic.add(traffic.received, message.ByteSize())
        return deserialize(message)

    allreduce.serialize_torch_tensor = counted_serialize
    allreduce.deserialize_torch_tensor = counted_deserialize
    averager.deserialize_torch_tensor = counted_deserialize


class GuardedAllReduceRunner(AllReduceRunner):
    """hivemind 1.1.12's AllReduceRunner whose reducer side trusts no sender's claims.

    `_accumulate_parts_streaming` is hivemind's, except: the weight is 1.0 for every sender (the protocol fixes
    it, docs/merging.md), and a part is refused (the sender is dropped from the round, hivemind's ban) when its
    compression differs from `expected_compression` or it decodes to a non-finite value. Outputs of this
    peer's own parts are unchanged, so honest peers see exactly hivemind's plain mean.
    """

    def __init__(self, *, expected_compression: int | None = None, aggregation: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.expected_compression = expected_compression
        if aggregation == "centered_clip":  # robust.py: keep every sender's part, return CenteredClip of them
            from swarm_node.network.merging.robust import make_clipping_reducer

            self.tensor_part_reducer = make_clipping_reducer(
                tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids))

    def _check_part(self, msg) -> tuple[torch.Tensor, int]:
        compression = msg.tensor_part.compression
        if self.expected_compression is not None and compression != self.expected_compression:
            raise AllreduceException(f"part compressed with {compression}, the group uses {self.expected_compression}")
        part = _allreduce_module.deserialize_torch_tensor(msg.tensor_part)  # looked up late: counted (bytes)
        if not torch.isfinite(part).all():
            raise AllreduceException("part holds non-finite values")
        return part, compression

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, part_compression in amap_in_executor(
                self._check_part, stream, max_prefetch=self.tensor_part_container.prefetch
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=1.0)
                    part_index += 1
                except BannedException:
                    break
                serialized_delta = await loop.run_in_executor(
                    None, lambda: _allreduce_module.serialize_torch_tensor(averaged_part - tensor_part, part_compression))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized_delta)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class Instrumented:
    """Mixin for hivemind averager classes (DecentralizedAverager and its subclasses): byte counters, per-round
    failure signals and quiet "no group" logs. Call `_instrument(kwargs)` before the class's own __init__."""

    traffic: Traffic
    runner_cls: type = GuardedAllReduceRunner  # the all-reduce runner (an extension point; tests use a hostile one)

    def _instrument(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.aggregation = kwargs.pop("aggregation", "mean")  # merge_aggregation (reducer side)
        self.traffic = Traffic()
        # last round: values left un-averaged, senders dropped, group size; totals: rounds, rounds with a fault
        self._faults = mp.Array(ctypes.c_int64, 5)
        for key in ("compression", "state_compression"):
            kwargs[key] = CountingCompression(kwargs.get(key) or NoCompression(), self.traffic)
        return kwargs

    def reset_faults(self) -> None:
        for i in range(3):
            self._faults[i] = 0

    def faults(self) -> tuple[int, int, int]:
        """(values left un-averaged, senders dropped mid-round, group size) of the last all-reduce."""
        return int(self._faults[0]), int(self._faults[1]), int(self._faults[2])

    def round_totals(self) -> tuple[int, int]:
        """(all-reduce rounds finished, rounds among them with values left un-averaged) since start."""
        return int(self._faults[3]), int(self._faults[4])

    def run(self):  # runs in the child process
        _count_tensor_traffic(self.traffic)
        logging.getLogger("hivemind.averaging.averager").addFilter(_QuietNoGroup())
        super().run()

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        """hivemind 1.1.12's, except that the members' claimed bandwidths are ignored: every averaging member
        (mode NODE or AUX) reduces an equal share. hivemind sizes shares by claimed bandwidth, so one member
        claiming a huge bandwidth would reduce (and so control) almost every part."""
        from hivemind.averaging.averager import AveragingMode, enter_asynchronously

        try:
            _, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered))
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes)))
            modes = tuple(map(AveragingMode, mode_ids))
            reducers = sum(mode != AveragingMode.CLIENT for mode in modes)
            if reducers == 0:
                raise AllreduceException("no member of the group reduces")
            peer_fractions = tuple(0.0 if mode == AveragingMode.CLIENT else 1.0 / reducers for mode in modes)
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                await self._run_allreduce_inplace_(local_tensors, group_info, peer_fractions=peer_fractions, **kwargs)
                return user_gathered
        except BaseException as e:
            if isinstance(e, Exception):
                log.debug("all-reduce in group %s failed: %r", group_info.group_id, e)
            raise AllreduceException(f"{e.__class__.__name__} in _aggregate_with_group: {e}") from e

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """hivemind 1.1.12's implementation, plus recording the runner's failure signals when it ends."""
        group_id = group_info.group_id if group_id is None else group_id
        kwargs["weight"] = 1.0  # every member counts once (protocol v1)
        runner = self.runner_cls(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, aggregation=self.aggregation, expected_compression=getattr(kwargs.get("compression"), "compression_type", None), **kwargs)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        self._faults[2] = len(group_info.peer_ids)
        try:
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    tensor.add_(update, alpha=self._averaging_alpha)
                    self.last_updated = get_dht_time()
                    self._state_updated.set()
            else:
                async for _ in runner:
                    raise ValueError("aux peers should not receive averaged tensors")
        finally:
            failed = int(runner.tensor_part_container.failed_size)
            self._faults[0], self._faults[1] = failed, len(runner.banned_senders)
            self._faults[3] += 1
            self._faults[4] += failed > 0


class MergeAverager(Instrumented, DecentralizedAverager):
    """A DecentralizedAverager over `tensors` that counts bytes, records failure signals and serves `state_fn()`.

    Args:
        tensors: CPU tensors averaged in place (they are moved to shared memory).
        dht: the node's DHT.
        state_fn: called in this process when a peer downloads state; returns (metadata bytes, tensors).
        kwargs: DecentralizedAverager's (prefix, group sizes, timeouts, compression, ...).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dht, *, state_fn: Callable[[], tuple[bytes, list]],
                 **kwargs: Any):
        self._state_fn = state_fn
        super().__init__(tensors, dht, start=False, **self._instrument(kwargs))

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        """libp2p handler names: `{prefix}::SwarmMergeV1.{method}`. hivemind uses the Python class name, which
        would make any subclass (or another implementation) unreachable; the protocol fixes the name instead."""
        name = f"{RPC_SERVICE}.{method_name}"
        return f"{namespace}::{name}" if namespace is not None else name

    def get_current_state(self):
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    # State downloads from chosen donors (instead of hivemind's "highest claimed priority" choice).
    def fetch_state_infos(self, peers: Sequence[str], timeout: float) -> dict[str, bytes]:
        """Ask each donor (base58 peer IDs) for its state's metadata only (the first message of its state stream,
        then the stream is closed). Returns {peer: metadata bytes} for those that answered in time."""
        future = MPFuture()
        self._outer_pipe.send(("_fetch_state_infos", [], dict(peers=list(peers), timeout=timeout, future=future)))
        return future.result(timeout=timeout + 5)

    def download_state(self, peer: str, timeout: float) -> tuple[bytes, list[torch.Tensor]] | None:
        """Download one donor's whole state: (metadata bytes, tensors), or None if it failed or sent none."""
        future = MPFuture()
        self._outer_pipe.send(("_download_state", [], dict(peer=peer, timeout=timeout, future=future)))
        return future.result(timeout=timeout + 5)

    async def _open_state_stream(self, peer: str):
        stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
        return await stub.rpc_download_state(averaging_pb2.DownloadRequest())

    async def _fetch_state_infos(self, future, peers: list[str], timeout: float) -> None:
        async def first_metadata(peer: str):
            stream = await self._open_state_stream(peer)
            try:
                async for message in stream:
                    return self.serializer.loads(message.metadata) if message.metadata else None
            finally:
                await stream.aclose()

        async def guarded(peer: str):
            try:
                return await asyncio.wait_for(first_metadata(peer), timeout)
            except Exception as e:
                log.debug("no state metadata from %s: %r", peer, e)
                return None

        try:
            results = await asyncio.gather(*(guarded(p) for p in peers))
            future.set_result({p: r for p, r in zip(peers, results) if isinstance(r, bytes)})
        except BaseException as e:
            if not future.done():
                future.set_result({})
            if not isinstance(e, Exception):
                raise

    async def _download_state(self, future, peer: str, timeout: float) -> None:
        try:
            async def whole():
                stream = await self._open_state_stream(peer)
                metadata, parts, tensors = None, [], []
                async for message in aiter_with_timeout(stream, timeout=timeout):
                    if message.metadata:
                        metadata = self.serializer.loads(message.metadata)
                    if message.tensor_part.dtype and parts:
                        tensors.append(_averager_module.deserialize_torch_tensor(combine_from_streaming(parts)))
                        parts = []
                    parts.append(message.tensor_part)
                if parts:
                    tensors.append(_averager_module.deserialize_torch_tensor(combine_from_streaming(parts)))
                return (metadata, tensors) if isinstance(metadata, bytes) else None

            future.set_result(await asyncio.wait_for(whole(), timeout))
        except Exception as e:
            log.debug("state download from %s failed: %r", peer, e)
            if not future.done():
                future.set_result(None)


def start_in_main_thread(factory: Callable[[], Any]) -> Any:
    """Create (and start) hivemind averagers in the main thread; restore the SIGINT handler hivemind replaces."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("hivemind averagers must be created in the main thread")
    handler = signal.getsignal(signal.SIGINT)
    try:
        return factory()
    finally:
        signal.signal(signal.SIGINT, handler)
