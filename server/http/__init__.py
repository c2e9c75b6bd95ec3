"""The HTTP transport: the rerank ecosystem's shapes (Cohere, Jina, TEI, OpenAI), a JSON API
that mirrors the gRPC one, the OpenAPI docs and a search page, all on one port."""
