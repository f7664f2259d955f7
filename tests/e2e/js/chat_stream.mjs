// Drives Corral's Ollama port with the official `ollama` npm package and prints one
// JSON object with what it saw; tests/e2e/test_ollama_e2e.py checks it.
// Usage: node chat_stream.mjs http://127.0.0.1:PORT MODEL
import { Ollama } from 'ollama'

const [host, model] = process.argv.slice(2)
const ollama = new Ollama({ host })
const out = {}

out.version = (await ollama.version()).version
out.models = (await ollama.list()).models.map((m) => m.name)

// ollama-js throws "Did not receive done or success response in stream" when a stream
// ends without a done line: iterating to the end proves the stream ended cleanly.
const stream = await ollama.chat({
  model,
  messages: [{ role: 'user', content: 'Say hello.' }],
  stream: true,
  options: { num_predict: 8, temperature: 0 },
})
out.text = ''
out.parts = 0
for await (const part of stream) {
  out.parts += 1
  out.text += part.message.content
  if (part.done) {
    out.done = true
    out.done_reason = part.done_reason
    out.eval_count = part.eval_count
  }
}

const gen = await ollama.generate({ model, prompt: 'Once upon a time', stream: false,
  options: { num_predict: 4 } })
out.generate_done = gen.done

try {
  await ollama.chat({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] })
  out.error_status = null
} catch (e) {
  out.error_status = e.status_code
  out.error_name = e.name
}

console.log(JSON.stringify(out))
