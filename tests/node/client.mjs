// Upserts, searches, reranks and checks health against a Tandem server, then prints one JSON
// object with what came back. Usage: node client.mjs HOST:PORT
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const options = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const tandem = grpc.loadPackageDefinition(
  protoLoader.loadSync(path.join(here, "../../protos/tandem/v1/tandem.proto"), options),
).tandem.v1;
const health = grpc.loadPackageDefinition(
  protoLoader.loadSync(path.join(here, "health.proto"), options),
).grpc.health.v1;

const address = process.argv[2];
const credentials = grpc.credentials.createInsecure();
const client = new tandem.Retrieval(address, credentials);
const checker = new health.Health(address, credentials);
const deadline = () => new Date(Date.now() + 30_000);
const unary = (target, method, request) =>
  new Promise((resolve, reject) =>
    target[method](request, { deadline: deadline() }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    ),
  );

function upsert(documents) {
  return new Promise((resolve, reject) => {
    const call = client.Upsert({ deadline: deadline() }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
    for (const document of documents) call.write({ documents: [document] });
    call.end();
  });
}

const struct = (object) => ({
  fields: Object.fromEntries(
    Object.entries(object).map(([key, value]) => [key, { stringValue: value }]),
  ),
});

const documents = [
  { id: "node-1", text: "The Eiffel Tower is a wrought-iron tower in Paris, France.", metadata: struct({ lang: "en" }) },
  { id: "node-2", text: "Photosynthesis turns sunlight, water and carbon dioxide into sugar.", metadata: struct({ lang: "en" }) },
  { id: "node-3", text: "The Great Wall of China stretches thousands of kilometres.", metadata: struct({ lang: "en" }) },
];

const out = {};
out.health = (await unary(checker, "Check", { service: "tandem.v1.Retrieval" })).status;
out.upsert = await upsert(documents);
const search = await unary(client, "Search", {
  query: "which tower stands in Paris",
  recall_k: 3,
  top_n: 2,
  include_text: true,
  rerank_budget_ms: 0,
});
out.search = search.hits.map((hit) => ({ id: hit.id, reranked: hit.reranked, text: hit.text }));
out.search_reranked = search.reranked_count;
const rerank = await unary(client, "Rerank", {
  query: "how do plants make food",
  documents: [{ text: "Cats sleep most of the day." }, { id: "node-2" }],
  return_documents: true,
  rerank_budget_ms: 0,
});
out.rerank = rerank.results.map((result) => ({ index: result.index, id: result.id ?? null }));
try {
  await unary(client, "Search", { query: "x", recall_k: 0 });
  out.bad_request = "OK";
} catch (error) {
  out.bad_request = grpc.status[error.code];
}
console.log(JSON.stringify(out));
client.close();
checker.close();
