//! The Lua scripts of every multi-key step (submit, mark delivered,
//! complete, touch, backlog): each runs atomically in Redis, so a crash
//! cannot leave half of one behind.

use std::sync::OnceLock;

use redis::Script;

pub(super) const SUBMIT: &str = r"
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local entry = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HSET', KEYS[2], 'state', 'queued', 'attempts', 0, 'entry', entry)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return entry
";

/// KEYS: stream, then job key and result key of each entry.
/// ARGV: group, consumer, ttl ms, then the entry ids.
/// Returns the attempt count of each entry, 0 for entries whose job already
/// has a result (those are acknowledged and deleted).
pub(super) const MARK_DELIVERED: &str = r"
local out = {}
local ttl = tonumber(ARGV[3])
for i = 1, #ARGV - 3 do
  local entry = ARGV[3 + i]
  local job = KEYS[2 * i]
  local result = KEYS[2 * i + 1]
  if redis.call('EXISTS', result) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    redis.call('XDEL', KEYS[1], entry)
    out[i] = 0
  else
    out[i] = redis.call('HINCRBY', job, 'attempts', 1)
    redis.call('HSET', job, 'state', 'running', 'consumer', ARGV[2])
    if redis.call('PTTL', job) < ttl then redis.call('PEXPIRE', job, ttl) end
  end
end
return out
";

/// KEYS: result, job, stream. ARGV: encoded result, ttl ms, group, entry id,
/// channel, job id. Returns 1 if this result was written.
pub(super) const COMPLETE: &str = r"
local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if won then
  redis.call('HSET', KEYS[2], 'state', 'done')
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
end
if won then return 1 end
return 0
";

/// KEYS: stream. ARGV: group, consumer, entry ids. Resets the idle time of
/// the entries still pending for that consumer.
pub(super) const TOUCH: &str = r"
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return 0
";

/// KEYS: stream. ARGV: group. Returns {length, pending}. Acknowledged
/// entries are deleted, so length - pending entries await delivery.
pub(super) const BACKLOG: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local len = redis.call('XLEN', KEYS[1])
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
local pending = 0
if type(p) == 'table' and p.err == nil then pending = p[1] end
return {len, pending}
";

pub(super) fn script(cell: &'static OnceLock<Script>, src: &str) -> &'static Script {
    cell.get_or_init(|| Script::new(src))
}

pub(super) static SUBMIT_SCRIPT: OnceLock<Script> = OnceLock::new();
pub(super) static MARK_SCRIPT: OnceLock<Script> = OnceLock::new();
pub(super) static COMPLETE_SCRIPT: OnceLock<Script> = OnceLock::new();
pub(super) static TOUCH_SCRIPT: OnceLock<Script> = OnceLock::new();
pub(super) static BACKLOG_SCRIPT: OnceLock<Script> = OnceLock::new();
