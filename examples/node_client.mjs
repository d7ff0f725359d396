// roombus.js from Node.js: join a room, print what arrives (with its position), and
// publish each line typed on stdin once the server acknowledges it.
//
//   python3 -m roombus serve &            # a server on ws://127.0.0.1:8765/ws
//   node --experimental-websocket examples/node_client.mjs lobby ann
//
// (Node.js 22 and newer have WebSocket built in: drop the flag.) Stop the server and
// start it again while this runs: the client reconnects by itself and says what it
// could recover; lines typed meanwhile are sent once it is back.
import { createInterface } from "node:readline";

import { connect } from "../src/roombus/js/roombus.js";

const [room = "lobby", username = "node"] = process.argv.slice(2);
const url = process.env.ROOMBUS_URL || "ws://127.0.0.1:8765/ws";
const client = connect(url, { rooms: [room], username });

client.on("connected", () => console.log("* connected"));
client.on("disconnected", (d) =>
  console.log(d.final ? `* closed (${d.code} ${d.reason})` : `* disconnected, reconnecting in ${d.reconnectIn.toFixed(1)} s`));
client.on("joined", (j) => {
  if (j.recovered === false) console.log(`* could not recover everything: ${j.reason}`, j.lost ?? "");
  console.log(`* in ${j.room} at ${j.epoch}:${j.seq}`);
});
client.on("reset", (r) => console.log(`* ${r.room}'s numbering restarted (${r.reason})`));
client.on("presence", (p) => console.log(`* ${p.room}: ${p.users.join(", ")}`));
client.on("message", (m) => console.log(`${m.seq ?? "-"} <${m.username}> ${JSON.stringify(m.content)}${m.replayed ? " (replayed)" : ""}`));

const lines = createInterface({ input: process.stdin });
lines.on("line", async (text) => {
  try {
    const pos = await client.publish(room, text);
    console.log(`* acknowledged as ${pos.epoch}:${pos.seq}`);
  } catch (err) {
    console.log(`* not sent: ${err.message}`);
  }
});
lines.on("close", () => client.close());
