//! Producers' side of the audit log: a durable local spool and a background shipper to the audit service.
