// Drives trioprovider with the npm clients VoidEditor ships (openai 4.96.0, ollama 0.5.15), the way
// Void calls them, and prints what Void would read as one JSON object. Run by test_void_clients.py.
import OpenAI from "openai";
import { Ollama } from "ollama";

const { PROVIDER_URL, API_KEY, OLLAMA_URL } = process.env;
const out = {};

// OpenAI-Compatible provider: base URL with /v1 as typed, a key, chat always streamed, tools whose
// properties carry only descriptions.
const openai = new OpenAI({ baseURL: `${PROVIDER_URL}/v1`, apiKey: API_KEY, maxRetries: 0 });
const tools = [{
  type: "function",
  function: {
    name: "read_file",
    description: "Read a file",
    parameters: { type: "object", properties: { text: { description: "what to read" } }, required: ["text"] },
  },
}];
{
  const stream = await openai.chat.completions.create({
    model: "echo", stream: true, tools,
    messages: [{ role: "developer", content: "You are terse." }, { role: "user", content: "open main.py" }],
  });
  // Void's parse: concatenate id, name and arguments of the index-0 tool call across chunks.
  let text = "", id = "", name = "", args = "", finish = null, indexes = new Set();
  for await (const chunk of stream) {
    const choice = chunk.choices[0];
    text += choice?.delta?.content ?? "";
    for (const call of choice?.delta?.tool_calls ?? []) {
      indexes.add(call.index);
      id += call.id ?? ""; name += call.function?.name ?? ""; args += call.function?.arguments ?? "";
    }
    finish = choice?.finish_reason ?? finish;
  }
  out.toolChat = { text, id, name, args: JSON.parse(args), finish, indexes: [...indexes] };
}
{
  const stream = await openai.chat.completions.create({ model: "echo", stream: true, messages: [{ role: "user", content: "hello void" }] });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  out.chat = text;
}
// FIM through /v1/completions, not streamed, as Void sends it.
{
  const fim = await openai.completions.create({ model: "echo", prompt: "def add(a, b):", suffix: "\n    return c", stop: ["\n\n"], max_tokens: 300 });
  out.fim = fim.choices[0].text;
}
// Errors surface as the SDK's own classes.
try {
  await new OpenAI({ baseURL: `${PROVIDER_URL}/v1`, apiKey: "wrong", maxRetries: 0 }).chat.completions.create({ model: "echo", messages: [{ role: "user", content: "x" }] });
} catch (error) {
  out.wrongKey = { status: error.status, isAuthError: error instanceof OpenAI.AuthenticationError };
}

// Ollama provider: the key-less listener; lists with /api/tags, FIM with /api/generate raw + suffix,
// chat through /v1 on the same host with 'Bearer noop'.
const ollama = new Ollama({ host: OLLAMA_URL });
out.tags = (await ollama.list()).models.map((m) => m.name);
{
  const stream = await ollama.generate({
    model: "echo", prompt: "const x = ", suffix: ";\n", raw: true, stream: true,
    options: { stop: ["\n\n"], num_predict: 300 },
  });
  let response = "", last = null;
  for await (const part of stream) { response += part.response; last = part; }
  out.ollamaFim = { response, done: last.done, doneReason: last.done_reason, evalCount: last.eval_count, totalDuration: last.total_duration };
}
{
  const noop = new OpenAI({ baseURL: `${OLLAMA_URL}/v1`, apiKey: "noop", maxRetries: 0 });
  const stream = await noop.chat.completions.create({ model: "echo", stream: true, messages: [{ role: "user", content: "via ollama" }] });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  out.noopChat = text;
}
console.log(JSON.stringify(out));
