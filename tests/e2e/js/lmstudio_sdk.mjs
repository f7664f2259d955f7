// Drives Corral's LM Studio port with the official @lmstudio/sdk (tests/e2e/test_lmstudio_sdk_e2e.py,
// tests/integration/test_lmstudio_sdk.py). Usage: node lmstudio_sdk.mjs ws://127.0.0.1:PORT MODEL
// Prints one JSON line; exits 1 on any warning the SDK logs (a communicationWarning means it
// rejected a message of ours: schema drift) or on any error.
import { LMStudioClient } from "@lmstudio/sdk";

const [baseUrl, modelName] = process.argv.slice(2);
const warnings = [];
const logger = {
  debug: () => {},
  info: () => {},
  warn: (...args) => warnings.push(args.map(String).join(" ")),
  error: (...args) => warnings.push(args.map(String).join(" ")),
};
const timeout = setTimeout(() => {
  console.error("timed out (a hang: a message the SDK dropped?)", warnings);
  process.exit(1);
}, 240_000);

const client = new LMStudioClient({ baseUrl, logger });
const downloaded = (await client.system.listDownloadedModels()).map((m) => m.modelKey);
const model = await client.llm.model(modelName);
const loaded = (await client.llm.listLoaded()).map((m) => m.identifier);
const prediction = model.respond([{ role: "user", content: "Say hello." }], { maxTokens: 8 });
let streamed = "";
for await (const fragment of prediction) streamed += fragment.content;
const result = await prediction;
const whole = await model.respond("Name a colour.", { maxTokens: 4, temperature: 0 });
const contextLength = await model.getContextLength();
clearTimeout(timeout);
console.log(JSON.stringify({
  downloaded, loaded, streamed, content: result.content, stopReason: result.stats.stopReason,
  predicted: result.stats.predictedTokensCount, whole: whole.content, contextLength, warnings,
}));
process.exit(warnings.length ? 1 : 0);
