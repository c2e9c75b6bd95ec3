"""A minimal Tandem client: search the demo index, then rerank two texts of your own.

python examples/python_client.py "what is vicarious trauma and how can it be coped with"
"""

from __future__ import annotations

import sys

import grpc

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc


def main() -> None:
    query = " ".join(sys.argv[1:]) or "what is vicarious trauma and how can it be coped with"
    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        stub = tandem_pb2_grpc.RetrievalStub(channel)
        # With a token: stub.Search(request, metadata=[("authorization", "Bearer <token>")])
        reply = stub.Search(
            pb.SearchRequest(query=query, recall_k=50, top_n=3, include_text=True), timeout=5
        )
        print(f"{reply.reranked_count}/{reply.candidates} candidates reranked in "
              f"{reply.timings.total_ms:.0f} ms")  # fmt: skip
        for hit in reply.hits:
            print(f"{hit.score:7.3f}  {hit.id}\n         {hit.text[:160]!r}")
        ranked = stub.Rerank(
            pb.RerankRequest(
                query=query,
                documents=[
                    pb.RerankDocument(
                        text="Vicarious trauma comes from hearing about the trauma of others."
                    ),
                    pb.RerankDocument(text="The stock market closed higher on Friday."),
                ],
                return_documents=True,
            ),
            timeout=5,
        )
        for result in ranked.results:
            print(f"{result.relevance_score:7.3f}  {result.text}")


if __name__ == "__main__":
    main()
