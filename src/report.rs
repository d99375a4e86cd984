//! The transport-security report page (admin listener): delivery events and their rendering.
