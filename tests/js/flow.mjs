// One client session with the unmodified Chroma JS client (npm chromadb 3.5.0), printed as
// JSON so that test_js_client.py can compare a run through the proxy with a direct run.
// Usage: node flow.mjs http://127.0.0.1:PORT COLLECTION_NAME [reads]
// With "create-only", it stops after creating and filling the collection; with "reads", only
// reads run, on a collection filled beforehand.
import { ChromaClient } from "chromadb";

const [base, name, mode] = process.argv.slice(2);
const url = new URL(base);
const client = new ChromaClient({ host: url.hostname, port: Number(url.port), ssl: false });
const out = [];
const plain = (value) => JSON.parse(JSON.stringify(value ?? null));
async function step(label, fn) {
  try {
    out.push([label, plain(await fn())]);
  } catch (error) {
    out.push([label, "error", error.constructor.name, error.message]);
  }
}

const rows = 60;
const ids = Array.from({ length: rows }, (_, i) => `js${i}`);
// Four well separated clusters, so nearest neighbours are unambiguous.
const embeddings = ids.map((_, i) => [10 * (i % 4), 5 * ((i % 4) % 2), i / 100, 1]);
const metadatas = ids.map((_, i) => ({ g: i % 4, even: i % 2 === 0, tags: [`t${i % 3}`] }));
const documents = ids.map((_, i) => `document ${i} about ${["cats", "dogs", "fish"][i % 3]}`);

const query = { queryEmbeddings: [[10, 5, 0.1, 1], [0, 0, 0.5, 1]], nResults: 4 };

async function reads(col) {
  await step("count", () => col.count());
  await step("peek", () => col.peek({ limit: 3 }));
  await step("get where", () => col.get({ where: { g: 1 }, limit: 5, offset: 1 }));
  await step("get ids", () => col.get({ ids: ["js3", "js1", "nope"], include: ["embeddings", "metadatas"] }));
  await step("get doc", () => col.get({ whereDocument: { $contains: "fish" }, include: ["documents"] }));
  await step("query", () => col.query(query));
  await step("query where", () => col.query({ ...query, where: { $and: [{ even: true }, { tags: { $contains: "t1" } }] },
    include: ["distances", "metadatas", "documents", "embeddings"] }));
  await step("bad dimension", () => col.query({ queryEmbeddings: [[1, 2]], nResults: 1 }));
}

if (mode === "reads") {
  await reads(await client.getCollection({ name, embeddingFunction: null }));
  console.log(JSON.stringify(out));
  process.exit(0);
}

const col = await client.createCollection({
  name, embeddingFunction: null, metadata: { owner: "js" },
  configuration: { hnsw: { space: "l2" } },
});
await step("add", () => col.add({ ids, embeddings, metadatas, documents }));
if (mode === "create-only") {
  console.log(JSON.stringify(out));
  process.exit(0);
}
await reads(col);
await step("update", () => col.update({ ids: ["js1"], metadatas: [{ g: 9 }] }));
await step("read your write", () => col.get({ where: { g: 9 }, include: ["metadatas"] }));
await step("delete", () => col.delete({ ids: ["js2", "js3"] }));
await step("count after delete", () => col.count());
await step("query after delete", () => col.query(query));
await step("get collection", async () => (await client.getCollection({ name, embeddingFunction: null })).metadata);
await step("missing collection", () => client.getCollection({ name: `${name}-missing` }));
await step("delete collection", () => client.deleteCollection({ name }));
console.log(JSON.stringify(out));
