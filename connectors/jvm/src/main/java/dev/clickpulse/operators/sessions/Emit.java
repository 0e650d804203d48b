package dev.clickpulse.operators.sessions;

/** What a reducer call sends: a {@link SessionRecord} to ``sessions`` or a {@link LateEvent}. */
public interface Emit {}
