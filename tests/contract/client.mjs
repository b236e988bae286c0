// A web app's side of pangea-session-sync in Node.js, written from the README's
// "Database contract (for apps in other languages)" alone: lookup hashes, Fernet, and the
// PostgreSQL functions. tests/contract/test_node_client.py holds its answers and rows to
// worker.sessions'. Only node:crypto and the `pg` package.
import crypto from "node:crypto";

/** Prefix of the opaque cookie handles (then 32 base32 characters, 160 random bits). */
export const HANDLE_PREFIX = "lss_";
/** HKDF info deriving a lookup key from a Fernet key. */
const LOOKUP_INFO = "session-sync token lookup v1";
/** reason -> error_description, as the README's table gives them. */
export const DESCRIPTIONS = {
  unknown: "The token is not recognized",
  expired: "The token expired",
  replaced: "The token was replaced by a refresh",
  logged_out: "The session was logged out",
  revoked: "The session was revoked",
};

// --- keys: SESSION_SYNC_ENCRYPTION_KEYS, comma-separated Fernet keys; the first encrypts and hashes

export function parseKeys(value) {
  return value.split(",").map((k) => k.trim());
}

function keyBytes(fernetKey) {
  const raw = Buffer.from(fernetKey, "base64url");
  if (raw.length !== 32) throw new Error("a Fernet key is urlsafe base64 of 32 bytes");
  return raw;
}

/** Lowercase hex HMAC-SHA256 of value, keyed with HKDF-SHA256(key bytes, no salt, LOOKUP_INFO, 32). */
export function lookupHash(fernetKey, value) {
  const key = Buffer.from(crypto.hkdfSync("sha256", keyBytes(fernetKey), Buffer.alloc(0), LOOKUP_INFO, 32));
  return crypto.createHmac("sha256", key).update(value, "utf8").digest("hex");
}

/** One hash per configured key, first key first. */
export function lookupHashes(keys, value) {
  return keys.map((k) => lookupHash(k, value));
}

// --- Fernet (its published spec): version 0x80, 8-byte time, 16-byte IV, AES-128-CBC, HMAC-SHA256

function urlsafe(buffer) {
  return buffer.toString("base64").replaceAll("+", "-").replaceAll("/", "_"); // keeps the = padding
}

export function encrypt(keys, plaintext) {
  const raw = keyBytes(keys[0]);
  const iv = crypto.randomBytes(16);
  const time = Buffer.alloc(8);
  time.writeBigUInt64BE(BigInt(Math.floor(Date.now() / 1000)));
  const cipher = crypto.createCipheriv("aes-128-cbc", raw.subarray(16), iv);
  const body = Buffer.concat([Buffer.from([0x80]), time, iv, cipher.update(plaintext, "utf8"), cipher.final()]);
  const mac = crypto.createHmac("sha256", raw.subarray(0, 16)).update(body).digest();
  return urlsafe(Buffer.concat([body, mac]));
}

/** The plaintext, trying every configured key (rows encrypted before a rotation use an older one). */
export function decrypt(keys, token) {
  const data = Buffer.from(token, "base64url");
  if (data.length < 57 || data[0] !== 0x80) throw new Error("not a Fernet token");
  const body = data.subarray(0, data.length - 32);
  const mac = data.subarray(data.length - 32);
  for (const key of keys) {
    const raw = keyBytes(key);
    const expected = crypto.createHmac("sha256", raw.subarray(0, 16)).update(body).digest();
    if (!crypto.timingSafeEqual(expected, mac)) continue;
    const decipher = crypto.createDecipheriv("aes-128-cbc", raw.subarray(16), body.subarray(9, 25));
    return Buffer.concat([decipher.update(body.subarray(25)), decipher.final()]).toString("utf8");
  }
  throw new Error("no configured key decrypts this token");
}

function base32(bytes) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0;
  let value = 0;
  let out = "";
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  return out;
}

// --- the functions ---------------------------------------------------------------------------

/**
 * Record a login from the /v2/client/userinfo envelope (or its result). Returns
 * {id, outcome, handle}: outcome is recorded, already_recorded (the same live login: the new
 * handle replaces the old) or conflict (no handle works). Never aborts the caller's transaction.
 */
export async function recordLogin(db, keys, userinfo) {
  const result = "status" in userinfo ? userinfo.result : userinfo;
  if ("status" in userinfo && userinfo.status !== "Success") throw new Error("userinfo is not a Success");
  const active = result.active_token;
  const refresh = result.refresh_token;
  const handle = HANDLE_PREFIX + base32(crypto.randomBytes(20));
  const { rows } = await db.query(
    `SELECT session_id, outcome FROM session_sync_record_login(
       p_user_id => $1, p_email => $2, p_pangea_session_id => $3, p_active_token_id => $4,
       p_active_token_enc => $5, p_active_token_hash => $6, p_refresh_token_enc => $7,
       p_active_issued_at => $8, p_active_expires_at => $9, p_refresh_expires_at => $10,
       p_handle_hash => $11)`,
    [
      active.identity,
      active.email,
      refresh.id, // the session id /v2/session/list reports
      active.id,
      encrypt(keys, active.token),
      lookupHash(keys[0], active.token),
      encrypt(keys, refresh.token),
      active.created_at,
      active.expire,
      refresh.expire,
      lookupHash(keys[0], handle),
    ],
  );
  const [{ session_id: id, outcome }] = rows;
  return { id: id === null ? null : Number(id), outcome, handle: outcome === "conflict" ? null : handle };
}

function challenge(realm, reason) {
  const quoted = `Bearer realm="${realm.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"`;
  if (reason === "missing") return quoted;
  return `${quoted}, error="invalid_token", error_description="${DESCRIPTIONS[reason]}"`;
}

/**
 * Authenticate a request's credential: a cookie handle (lss_...), a bearer token, or a local id.
 * Returns {status: 200, session} or {status: 401, reason, challenge} (the WWW-Authenticate value).
 * `now` (an ISO time, or null for the database's clock) lets a test ask both sides at one instant.
 */
export async function authenticate(db, keys, credential, { grace = "2m", realm = "session-sync", now = null } = {}) {
  if (credential === null || credential === undefined || credential === "") {
    return { status: 401, reason: "missing", challenge: challenge(realm, "missing") };
  }
  let rows;
  if (typeof credential === "number") {
    if (!Number.isSafeInteger(credential) || credential < 1) {
      return { status: 401, reason: "unknown", challenge: challenge(realm, "unknown") };
    }
    ({ rows } = await db.query("SELECT * FROM session_sync_authenticate_id($1, $2)", [credential, now]));
  } else {
    const handle = credential.startsWith(HANDLE_PREFIX);
    ({ rows } = await db.query("SELECT * FROM session_sync_authenticate($1, $2, $3, $4)", [
      lookupHashes(keys, credential),
      handle,
      handle ? null : grace,
      now, // null: the database's clock
    ]));
  }
  const [answer] = rows;
  if (answer.reason !== null) {
    return { status: 401, reason: answer.reason, challenge: challenge(realm, answer.reason) };
  }
  return {
    status: 200,
    session: {
      id: Number(answer.session_id),
      user_id: answer.user_id,
      email: answer.email,
      expires_at: answer.expires_at,
      created_at: answer.created_at,
      last_checked_at: answer.last_checked_at,
      uncertain: answer.uncertain,
      rotated_token: answer.rotated_token_enc === null ? null : decrypt(keys, answer.rotated_token_enc),
    },
  };
}

/** Log one session out: {found, state, event_id} (event_id null: it had already ended). */
export async function logout(db, sessionId, reason = "user_logout") {
  const { rows } = await db.query("SELECT * FROM session_sync_logout($1, $2)", [sessionId, reason]);
  if (rows.length === 0) return { found: false };
  const [row] = rows;
  return { found: true, state: row.state, event_id: row.event_id === null ? null : Number(row.event_id) };
}

/** Log every session of a user out and queue one /v2/session/logout: {found, session_ids, event_id}. */
export async function logoutUser(db, userId, reason = "user_logout") {
  const { rows } = await db.query("SELECT * FROM session_sync_logout_user($1, $2)", [userId, reason]);
  if (rows.length === 0) return { found: false };
  const [row] = rows;
  return { found: true, session_ids: row.session_ids.map(Number), event_id: Number(row.event_id) };
}
