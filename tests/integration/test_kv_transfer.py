"""KV blocks between Ray actors over on-demand pair groups (gloo on CPU, real sockets).

The control plane here is the test itself: it carries only addresses and block ids between
actors, as the orchestrator will.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from kernels.kv_pack import pack_blocks
from services.runtime.kv_cache import KVCache
from services.runtime.model_config import ModelConfig
from services.transfer.kv_transfer import KVTransferMeta, recv_kv, send_kv
from services.transfer.pair_group import PairGroupConfig, PairGroupError, PairGroups
from services.transfer.transport import TorchDistributedTransport, TransferError

TINY = ModelConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
BLOCK_SIZE = 4
NUM_BLOCKS = 12


@ray.remote(num_cpus=0)
class KVWorker:
    """A worker holding a KV cache, with the transfer side of a prefill or decode worker."""

    def __init__(self, worker_id: str, seed: int) -> None:
        torch.set_num_threads(1)
        self.groups = PairGroups(worker_id, config=PairGroupConfig(timeout_s=10))
        self.transport = TorchDistributedTransport(self.groups)
        self.cache = KVCache.allocate(TINY, NUM_BLOCKS, BLOCK_SIZE, torch.float32)
        g = torch.Generator().manual_seed(seed)
        for k, v in self.cache.layers:
            k.copy_(torch.randn(k.shape, generator=g))
            v.copy_(torch.randn(v.shape, generator=g))

    def open(self, peer_id: str) -> str:
        return self.groups.open(peer_id)

    def join(self, peer_id: str, address: str, rank: int) -> None:
        self.groups.join(peer_id, address, rank)

    def peers(self) -> list[str]:
        return sorted(self.groups.peers())

    def close(self, peer_id: str) -> bool:
        return self.groups.close(peer_id)

    def send(self, peer_id: str, meta: KVTransferMeta) -> None:
        meta.check_cache(self.cache.layers)
        send_kv(self.transport, peer_id, self.cache.layers, meta.src_block_ids, meta.layers_per_chunk).wait()

    def recv(self, peer_id: str, meta: KVTransferMeta) -> str:
        meta.check_cache(self.cache.layers)
        try:
            recv_kv(self.transport, peer_id, self.cache.layers, meta.dst_block_ids, meta.layers_per_chunk).wait(5.0)
        except TransferError as e:
            return f"TransferError: {e}"
        return "ok"

    def blocks(self, block_ids: tuple[int, ...]) -> torch.Tensor:
        return pack_blocks(self.cache.layers, list(block_ids))


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():  # another module's cluster: use it, leave it running
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pair(opener, joiner, opener_id: str, joiner_id: str) -> None:
    """Form a pair group; both joins run at once, since each blocks until the other arrives."""
    address = ray.get(opener.open.remote(joiner_id))
    ray.get([opener.join.remote(joiner_id, address, 0), joiner.join.remote(opener_id, address, 1)])


def move(sender, receiver, sender_id: str, receiver_id: str, src: tuple[int, ...], dst: tuple[int, ...],
         layers_per_chunk: int = 1) -> None:
    meta = KVTransferMeta(request_id="req", src_block_ids=src, dst_block_ids=dst, num_layers=TINY.num_hidden_layers,
                          block_shape=(BLOCK_SIZE, TINY.num_key_value_heads, TINY.head_dim), dtype="float32",
                          layers_per_chunk=layers_per_chunk)
    receiving = receiver.recv.remote(sender_id, meta)  # the receiver's blocks are allocated: it posts first
    ray.get(sender.send.remote(receiver_id, meta))
    assert ray.get(receiving) == "ok"
    sent, got = ray.get([sender.blocks.remote(src), receiver.blocks.remote(dst)])
    assert torch.equal(got, sent)


def test_pairs_form_on_demand_and_survive_others(ray_cluster):
    a, b, c = (KVWorker.remote(name, seed) for seed, name in enumerate("abc"))

    pair(a, b, "a", "b")
    move(a, b, "a", "b", src=(7, 2, 9), dst=(0, 11, 4))  # scattered blocks, one layer per message
    move(b, a, "b", "a", src=(1,), dst=(3,), layers_per_chunk=4)  # either way, whole cache in one message

    # A third worker pairs with `a` later; the a-b group is not re-formed and keeps working.
    pair(c, a, "c", "a")
    assert ray.get([a.peers.remote(), b.peers.remote(), c.peers.remote()]) == [["b", "c"], ["a"], ["a"]]
    move(c, a, "c", "a", src=(0, 1, 2, 3), dst=(5, 6, 8, 10), layers_per_chunk=3)
    move(a, b, "a", "b", src=(5, 6), dst=(1, 2))

    # `c` dies: a transfer from it fails cleanly on `a`, and a-b still works.
    ray.kill(c)
    meta = KVTransferMeta(request_id="lost", src_block_ids=(0,), dst_block_ids=(9,), num_layers=4,
                          block_shape=(BLOCK_SIZE, 2, TINY.head_dim), dtype="float32", layers_per_chunk=4)
    assert ray.get(a.recv.remote("c", meta)).startswith("TransferError")
    assert ray.get(a.peers.remote()) == ["b"]  # the failed pair is closed
    move(b, a, "b", "a", src=(9, 10, 11), dst=(0, 1, 2), layers_per_chunk=2)
    move(a, b, "a", "b", src=(0, 1, 2), dst=(9, 10, 11))

    # And a pair closed on both sides can be formed again.
    assert ray.get([a.close.remote("b"), b.close.remote("a")]) == [True, True]
    pair(b, a, "b", "a")
    move(b, a, "b", "a", src=(4,), dst=(4,))
    for w in (a, b):
        ray.kill(w)


def test_metadata_is_checked_against_the_cache():
    with pytest.raises(ValueError, match="3 sender blocks but 2 receiver blocks"):
        KVTransferMeta("r", (1, 2, 3), (1, 2), 4, (4, 2, 16), "float32", 1)
    layers = KVCache.allocate(TINY, 4, BLOCK_SIZE, torch.float32).layers
    meta = KVTransferMeta.for_cache("r", layers, [0, 1], [2, 3])
    assert meta.nbytes == 2 * 4 * 2 * BLOCK_SIZE * 2 * 16 * 4 and meta.layers_per_chunk == 4
    meta.check_cache(layers)
    with pytest.raises(ValueError, match="expects"):
        meta.check_cache(KVCache.allocate(TINY, 4, BLOCK_SIZE, torch.bfloat16).layers)


def form_in_process(a: PairGroups, b: PairGroups) -> None:
    address = a.open(b.worker_id)
    joining = threading.Thread(target=b.join, args=(a.worker_id, address, 1))
    joining.start()
    a.join(b.worker_id, address, 0)
    joining.join()


def test_a_closed_pair_refuses_transfers():
    a, b = (PairGroups(name, config=PairGroupConfig(timeout_s=5)) for name in "ab")
    form_in_process(a, b)
    assert a.has("b") and a.close("b") and not a.has("b")
    with pytest.raises(PairGroupError, match="no pair group with 'b'"):
        TorchDistributedTransport(a).send("b", torch.zeros(4))
    b.close_all()
    assert b.peers() == []


def test_a_peer_that_never_joins_fails_the_rendezvous_within_the_timeout():
    a, b = (PairGroups(name, config=PairGroupConfig(timeout_s=1)) for name in "ab")
    address = a.open("b")  # `a` never joins
    start = time.monotonic()
    with pytest.raises(PairGroupError, match="could not form a gloo pair group with 'a'"):
        b.join("a", address, 1)
    assert time.monotonic() - start < 10
    assert not b.has("a")
    a.close_all()
