// The conformance test's driver: one JSON request per line on stdin, one JSON answer per line on
// stdout. Each request runs in its own transaction, as a web request would:
//   {"op": "configure", "keys": "<SESSION_SYNC_ENCRYPTION_KEYS>", "grace": "2m", "realm": "example"}
//   {"op": "record", "userinfo": {...}}            {"op": "authenticate", "credential": "..." | 7 | null, "now": iso}
//   {"op": "logout", "id": 7, "reason": "..."}     {"op": "logout_user", "user_id": "pui_...", "reason": "..."}
//   {"op": "record_then_query", "userinfo": {...}} (records, then proves the transaction still works)
//   {"op": "decrypt", "ciphertext": "..."}         {"op": "encrypt", "plaintext": "..."}
import readline from "node:readline";
import pg from "pg";
import * as contract from "./client.mjs";

pg.types.setTypeParser(pg.types.builtins.TIMESTAMPTZ, (text) => text); // keep microseconds
const db = new pg.Client({ connectionString: process.argv[2] });
await db.connect();
let config = { keys: [], grace: "2m", realm: "session-sync" };

async function inTransaction(work) {
  await db.query("BEGIN");
  try {
    const result = await work();
    await db.query("COMMIT");
    return result;
  } catch (error) {
    await db.query("ROLLBACK");
    throw error;
  }
}

const ops = {
  configure: async (r) => {
    config = { keys: contract.parseKeys(r.keys), grace: r.grace ?? "2m", realm: r.realm ?? "session-sync" };
    return null;
  },
  record: (r) => inTransaction(() => contract.recordLogin(db, config.keys, r.userinfo)),
  record_then_query: (r) =>
    inTransaction(async () => {
      const login = await contract.recordLogin(db, config.keys, r.userinfo);
      const { rows } = await db.query("SELECT 1 AS still_usable");
      return { ...login, still_usable: rows[0].still_usable === 1 };
    }),
  authenticate: (r) =>
    inTransaction(() =>
      contract.authenticate(db, config.keys, r.credential, { grace: config.grace, realm: config.realm, now: r.now }),
    ),
  logout: (r) => inTransaction(() => contract.logout(db, r.id, r.reason)),
  logout_user: (r) => inTransaction(() => contract.logoutUser(db, r.user_id, r.reason)),
  decrypt: async (r) => contract.decrypt(config.keys, r.ciphertext),
  encrypt: async (r) => contract.encrypt(config.keys, r.plaintext),
};

for await (const line of readline.createInterface({ input: process.stdin })) {
  const request = JSON.parse(line);
  let answer;
  try {
    answer = { ok: true, result: await ops[request.op](request) };
  } catch (error) {
    answer = { ok: false, error: String(error.message), code: error.code ?? null };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await db.end();
