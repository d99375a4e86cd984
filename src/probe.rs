//! `moat probe`: a STARTTLS/implicit-TLS capability test of one SMTP server.
