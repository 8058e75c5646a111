// Tool calls through tokenfan with the official `openai` npm SDK, unmodified (driven by
// tests/clients.rs): parallel streamed calls accumulated by the SDK's own stream helper, and the
// follow-up turn with the tool results. Usage: node openai_tools.mjs <gateway base URL>.
// Prints one JSON report on stdout.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: "unused" });
const tools = ["search", "lookup"].map((name) => ({
  type: "function",
  function: {
    name,
    parameters: { type: "object", properties: { query: { type: "string" } } },
  },
}));
const messages = [{ role: "user", content: "Find two things" }];
const report = {};

// The SDK's runner assembles tool-call fragments into the final message itself.
const stream = client.chat.completions.stream({
  model: "gpt-4o-mini",
  messages,
  tools,
  tool_choice: "required",
  mock: { tool_calls: 2, interval_ms: 1 },
});
let fragments = 0;
stream.on("chunk", (chunk) => {
  fragments += chunk.choices[0]?.delta?.tool_calls?.length ?? 0;
});
const final = await stream.finalChatCompletion();
const message = final.choices[0].message;
report.stream = {
  finish_reason: final.choices[0].finish_reason,
  fragments,
  tool_calls: message.tool_calls.map((call) => ({
    id: call.id,
    name: call.function.name,
    arguments: call.function.arguments,
  })),
};

const followUp = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [
    ...messages,
    message,
    ...message.tool_calls.map((call) => ({
      role: "tool",
      tool_call_id: call.id,
      content: JSON.stringify({ found: call.function.name }),
    })),
  ],
  tools,
  mock: { tokens: 4, interval_ms: 1 },
});
report.follow_up = {
  finish_reason: followUp.choices[0].finish_reason,
  content: followUp.choices[0].message.content,
};
console.log(JSON.stringify(report));
