package dev.clickpulse.operators.sessions;

/** An event too late for its session; the operator writes the original record to ``events.late``. */
public final class LateEvent implements Emit {
    public final String messageId;
    public final String userKey;
    public final long tsMs;
    public final long watermarkMs;

    LateEvent(String messageId, String userKey, long tsMs, long watermarkMs) {
        this.messageId = messageId;
        this.userKey = userKey;
        this.tsMs = tsMs;
        this.watermarkMs = watermarkMs;
    }
}
