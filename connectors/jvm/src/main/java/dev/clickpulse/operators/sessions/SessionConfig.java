package dev.clickpulse.operators.sessions;

import java.io.Serializable;

/** Time rules of sessionization, all in milliseconds (``udfs.sessions.SessionConfig``). */
public final class SessionConfig implements Serializable {
    private static final long serialVersionUID = 1L;

    /** Inactivity gap: an event this long or longer after the previous one starts a new session. */
    public final long gapMs;
    /** Maximum session length. */
    public final long maxMs;
    /** How far behind the watermark an event may be and still update its session. */
    public final long allowedLatenessMs;
    /** The watermark strategy's out-of-orderness bound (per key: newest event time minus this). */
    public final long outOfOrdernessMs;

    public SessionConfig(long gapMs, long maxMs, long allowedLatenessMs, long outOfOrdernessMs) {
        if (gapMs <= 0 || maxMs <= 0) {
            throw new IllegalArgumentException("gap_ms and max_ms must be positive");
        }
        if (allowedLatenessMs < 0 || outOfOrdernessMs < 0) {
            throw new IllegalArgumentException("allowed_lateness_ms and out_of_orderness_ms must be >= 0");
        }
        this.gapMs = gapMs;
        this.maxMs = maxMs;
        this.allowedLatenessMs = allowedLatenessMs;
        this.outOfOrdernessMs = outOfOrdernessMs;
    }

    /** The Python reducer's defaults (30 min gap, 24 h max, 1 h lateness, 60 s out-of-orderness). */
    public static SessionConfig defaults() {
        return new SessionConfig(30 * 60_000L, 24 * 3_600_000L, 3_600_000L, 60_000L);
    }
}
