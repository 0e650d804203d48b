package dev.clickpulse.operators.sessions;

/** An enriched record lacks what sessionization needs (``udfs.event.EventError`` or a JSON error). */
public final class MalformedEventException extends Exception {
    private static final long serialVersionUID = 1L;

    public MalformedEventException(String message) {
        super(message);
    }
}
