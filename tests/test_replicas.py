"""Three read-only replicas of a published collection behind nginx (Debian's), on loopback:
calls spread over all three, a replica killed with -9 costs at most its calls in flight, and
a newly published version reaches every replica within 5 s with no failed search."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from serving import fill_collection
from test_reliability import ServerProcess, model_args

from tandem.benchmarks.nginx import Nginx, NginxMissing
from tandem.server.replication.publish import publish
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPLICAS = 3


def start_nginx(upstreams: list[int], workdir: Path) -> Nginx:
    try:
        return Nginx(upstreams, workdir)
    except NginxMissing as missing:
        pytest.skip(str(missing))


def metrics_port(server: ServerProcess) -> int:
    for line in server.lines:
        if '"msg": "serving"' in line:
            return int(json.loads(line)["metrics_port"])
    raise AssertionError(server.log)


def searches_served(server: ServerProcess) -> float:
    url = f"http://127.0.0.1:{metrics_port(server)}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(r'tandem_requests_total\{code="OK",method="Search"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


SHED_RETRIES = 20


async def search_load(
    address: str, queries: list[str], *, calls: int | None = None, seconds: float | None = None,
    concurrency: int = 6,
) -> tuple[int, list[grpc.StatusCode]]:  # fmt: skip
    """(calls that succeeded, codes of those that failed), until ``calls`` or ``seconds``."""
    failures: list[grpc.StatusCode] = []
    done = 0
    sent = 0
    stop_at = None if seconds is None else time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]

        async def worker(number: int) -> None:
            nonlocal done, sent
            while (calls is None or sent < calls) and (
                stop_at is None or time.monotonic() < stop_at
            ):
                query = queries[sent % len(queries)]
                sent += 1
                for attempt in range(SHED_RETRIES + 1):
                    try:
                        await stub.Search(
                            pb.SearchRequest(query=query, recall_k=20, top_n=3), timeout=30
                        )
                        done += 1
                    except grpc.aio.AioRpcError as error:
                        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (
                            attempt < SHED_RETRIES
                        ):
                            # Shed, not failed: three replicas share 2 cores here, and a
                            # client backs off and retries as the server asks.
                            await asyncio.sleep(0.05)
                            continue
                        failures.append(error.code())
                    break

        await asyncio.gather(*(worker(number) for number in range(concurrency)))
    return done, failures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, bi_int8, ce_int8, data):
    base = tmp_path_factory.mktemp("replicas")
    writer, root = base / "writer", base / "root"
    fill_collection(writer, bi_int8[0], ce_int8[0], data.segments[:40])
    assert publish(writer, root) == "000001"
    replicas = [
        ServerProcess("--collection", str(root), *model_args(bi_int8, ce_int8),
                      "--metrics-port", "0", "--follow-seconds", "0.5")
        for _ in range(REPLICAS)
    ]  # fmt: skip
    nginx = start_nginx([replica.port for replica in replicas if replica.port], base / "nginx")
    yield {"writer": writer, "root": root, "replicas": replicas, "nginx": nginx}
    nginx.stop()
    for replica in replicas:
        replica.finish()


def test_calls_spread_over_every_replica(cluster, data):
    replicas = cluster["replicas"]
    before = [searches_served(replica) for replica in replicas]
    queries = [topic.query for topic in data.topics]
    done, failures = asyncio.run(search_load(cluster["nginx"].address, queries, calls=300))
    assert (done, failures) == (300, [])
    served = [searches_served(replica) - was for replica, was in zip(replicas, before, strict=True)]
    assert sum(served) == 300
    assert min(served) >= 50, served  # nginx balances calls, not connections
    # The client's own round_robin policy over the three addresses spreads them too.
    addresses = ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)
    channel = grpc.insecure_channel(f"ipv4:{addresses}",
                                    options=[("grpc.lb_policy_name", "round_robin")])  # fmt: skip
    stub = tandem_pb2_grpc.RetrievalStub(channel)
    for query in queries[:6]:  # until every subchannel is connected
        stub.Search(pb.SearchRequest(query=query, recall_k=20, top_n=3), timeout=30)
    before = [searches_served(replica) for replica in replicas]
    for query in queries[:60]:
        stub.Search(pb.SearchRequest(query=query, recall_k=20, top_n=3), timeout=30)
    served = [searches_served(replica) - was for replica, was in zip(replicas, before, strict=True)]
    assert sum(served) == 60
    assert min(served) >= 15, served
    channel.close()


def test_published_version_reaches_every_replica_without_a_failed_search(
    cluster, bi_int8, ce_int8, data
):
    fill_collection(cluster["writer"], bi_int8[0], ce_int8[0], data.segments[40:50])
    queries = [topic.query for topic in data.topics]

    async def scenario() -> tuple[list[float], int, list[grpc.StatusCode]]:
        load = asyncio.create_task(
            search_load(cluster["nginx"].address, queries, seconds=8.0, concurrency=4)
        )
        await asyncio.sleep(1.0)
        version = await asyncio.to_thread(publish, cluster["writer"], cluster["root"])
        published = time.monotonic()
        seen: list[float] = []
        for replica in cluster["replicas"]:
            stub = tandem_pb2_grpc.RetrievalStub(
                grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
            )  # type: ignore[no-untyped-call]
            while True:
                info = await stub.Info(pb.InfoRequest(), timeout=10)
                if info.collection_version == version:
                    seen.append(time.monotonic() - published)
                    assert info.index_size == 50
                    break
                assert time.monotonic() - published < 10, "a replica never switched"
                await asyncio.sleep(0.1)
        done, failures = await load
        return seen, done, failures

    seen, done, failures = asyncio.run(scenario())
    assert max(seen) <= 5.0, seen
    assert failures == []
    assert done > 0
    for replica in cluster["replicas"]:
        assert '"msg": "switched version"' in replica.log
        got = replica.stub().Get(pb.GetRequest(ids=[data.segments[45].id]), timeout=10)
        assert len(got.documents) == 1  # the new document, on every replica


def test_a_killed_replica_costs_at_most_its_calls_in_flight(cluster, data):
    queries = [topic.query for topic in data.topics]
    victim = cluster["replicas"][0]
    concurrency = 4

    async def scenario() -> tuple[int, list[grpc.StatusCode]]:
        load = asyncio.create_task(
            search_load(cluster["nginx"].address, queries, seconds=5.0, concurrency=concurrency)
        )
        await asyncio.sleep(1.5)
        victim.process.send_signal(signal.SIGKILL)
        return await load

    done, failures = asyncio.run(scenario())
    victim.process.wait(timeout=30)
    assert len(failures) <= concurrency, failures  # at most the calls it held
    assert done > 0
    after, failed_after = asyncio.run(search_load(cluster["nginx"].address, queries, calls=60))
    assert (after, failed_after) == (60, [])
