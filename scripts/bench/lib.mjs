// Bundled by run.mjs (esbuild) into .cache/bench/<run>/lib.mjs: the project's TypeScript helpers the
// benchmarks drive (the in-process xenstore server and client, libxl-style backend nodes, the stock
// scripts' fetcher). Not run directly.
export { startXenstoreServer } from '../../src/xenstore/server.js';
export { connectXenstore } from '../../src/xenstore/client.js';
export { writeBackendNodes, closeBackend, destroyNodes, backendPath } from '../../test/lib/backend-nodes.js';
export { stockScriptsDir, stockPrerequisites } from '../../test/lib/stock-scripts.js';
