// TEMPORARY STUB: replaced by the real pairing module.
pub type ConnId = u64;
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role { Server, Client }
pub struct Chunk<'a> { pub direction: u32, pub ts_enter: u64, pub ts_exit: u64, pub len: u64, pub payload: &'a [u8] }
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange { pub conn: ConnId, pub role: Role, pub method: String, pub path: String, pub host: Option<String>, pub user_agent: Option<String>, pub status: Option<u16>, pub start_ns: u64, pub end_ns: u64, pub request_bytes: u64, pub response_bytes: u64 }
pub struct Pairer;
impl Pairer {
    pub fn new(_idle: u64) -> Self { Pairer }
    pub fn on_chunk(&mut self, conn: ConnId, chunk: &Chunk, _out: &mut Vec<Exchange>) {
        eprintln!("chunk conn={conn:x} dir={} len={} ts={} payload={:?}", chunk.direction, chunk.len, chunk.ts_exit - chunk.ts_enter, String::from_utf8_lossy(&chunk.payload[..chunk.payload.len().min(60)]));
    }
    pub fn on_close(&mut self, conn: ConnId, _ts: u64, _out: &mut Vec<Exchange>) { eprintln!("close {conn:x}"); }
    pub fn tick(&mut self, _now: u64, _out: &mut Vec<Exchange>) {}
    pub fn is_not_http(&self, _conn: ConnId) -> bool { false }
    pub fn forget(&mut self, _conn: ConnId) {}
    pub fn parse_failures(&self) -> u64 { 0 }
}
