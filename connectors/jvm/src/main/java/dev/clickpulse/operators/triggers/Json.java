package dev.clickpulse.operators.triggers;

import java.io.IOException;
import java.math.BigDecimal;
import java.math.BigInteger;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonGenerator;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;

/**
 * JSON values as the Python reducer sees them after {@code orjson.loads}: {@code null}, {@link Boolean},
 * {@link String}, {@link Long} (or {@link BigInteger} beyond 64 bits), {@link Decimal} for numbers with a
 * fraction or exponent, {@code LinkedHashMap<String, Object>} (insertion order; a repeated key keeps its
 * first position and takes the last value, like a Python dict) and {@code ArrayList<Object>}.
 *
 * <p>{@link #dumps} writes what {@code orjson.dumps} writes for such a value (compact, the same string
 * escapes). A number with a fraction is written with the literal it was read with: identical to orjson's
 * output whenever the input was written by orjson, as every enriched event is.
 */
public final class Json {
    private Json() {}

    /** A JSON number with a fraction or an exponent (a Python {@code float}), with its literal text. */
    public static final class Decimal {
        final double value;
        final String literal;

        Decimal(double value, String literal) {
            this.value = value;
            this.literal = literal;
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof Decimal && ((Decimal) o).value == value;
        }

        @Override
        public int hashCode() {
            return Double.hashCode(value);
        }

        @Override
        public String toString() {
            return literal;
        }
    }

    /** Thrown for text that is not one JSON document. */
    public static final class ParseError extends Exception {
        private static final long serialVersionUID = 1L;

        ParseError(String message) {
            super(message);
        }
    }

    /** The value of one JSON document ({@link ParseError} when it is not valid JSON). */
    public static Object parse(JsonFactory json, byte[] raw) throws ParseError {
        try (JsonParser p = json.createParser(raw)) {
            return document(p);
        } catch (IOException | RuntimeException e) {
            throw new ParseError(e.getMessage());
        }
    }

    /** The value of one JSON document given as text. */
    public static Object parse(JsonFactory json, String text) throws ParseError {
        try (JsonParser p = json.createParser(text)) {
            return document(p);
        } catch (IOException | RuntimeException e) {
            throw new ParseError(e.getMessage());
        }
    }

    private static Object document(JsonParser p) throws IOException, ParseError {
        JsonToken t = p.nextToken();
        if (t == null) {
            throw new ParseError("empty document");
        }
        Object v = read(p, t);
        if (p.nextToken() != null) {
            throw new ParseError("trailing data after the document");
        }
        return v;
    }

    private static Object read(JsonParser p, JsonToken t) throws IOException {
        switch (t) {
            case START_OBJECT: {
                Map<String, Object> m = new LinkedHashMap<>();
                while (p.nextToken() == JsonToken.FIELD_NAME) {
                    String name = p.currentName();
                    m.put(name, read(p, p.nextToken()));
                }
                return m;
            }
            case START_ARRAY: {
                List<Object> l = new ArrayList<>();
                JsonToken n;
                while ((n = p.nextToken()) != JsonToken.END_ARRAY) {
                    l.add(read(p, n));
                }
                return l;
            }
            case VALUE_STRING:
                return p.getText();
            case VALUE_NUMBER_INT: {
                if (p.getNumberType() == JsonParser.NumberType.BIG_INTEGER) {
                    BigInteger big = p.getBigIntegerValue();
                    // orjson reads integers up to 2**64 - 1 as int and larger ones as float
                    if (big.bitLength() > 64) {
                        double d = big.doubleValue();
                        return new Decimal(d, Double.toString(d));
                    }
                    return big;
                }
                return p.getLongValue();
            }
            case VALUE_NUMBER_FLOAT:
                return new Decimal(p.getDoubleValue(), p.getText());
            case VALUE_TRUE:
                return Boolean.TRUE;
            case VALUE_FALSE:
                return Boolean.FALSE;
            case VALUE_NULL:
                return null;
            default:
                throw new IOException("unexpected token " + t);
        }
    }

    // ------------------------------------------------------------------------------------------ paths

    /**
     * {@code udfs.rules.definition.lookup_path}: the value at a path of keys, or {@code null} when absent.
     * Intermediate JSON-object strings ({@code properties} stored as text) are decoded.
     */
    @SuppressWarnings("unchecked")
    public static Object lookup(JsonFactory json, Map<String, Object> record, String[] path) {
        Object current = record;
        for (String segment : path) {
            if (current instanceof String && ((String) current).startsWith("{")) {
                try {
                    current = parse(json, (String) current);
                } catch (ParseError e) {
                    return null;
                }
            }
            if (!(current instanceof Map)) {
                return null;
            }
            Map<String, Object> m = (Map<String, Object>) current;
            current = m.get(segment);
            if (current == null) {
                return null;
            }
        }
        return current;
    }

    /** {@code _scalar_equal}: JSON semantics, so {@code true != 1}, {@code 1 == 1.0}, {@code "1" != 1}. */
    public static boolean scalarEqual(Object actual, Object expected) {
        if (actual instanceof Boolean || expected instanceof Boolean) {
            return actual instanceof Boolean && expected instanceof Boolean && actual.equals(expected);
        }
        if (actual == null || expected == null) {
            return actual == null && expected == null;
        }
        if (isNumber(actual) && isNumber(expected)) {
            if (actual instanceof Long && expected instanceof Long) {
                return ((Long) actual).longValue() == ((Long) expected).longValue();
            }
            return exact(actual).compareTo(exact(expected)) == 0;
        }
        if (actual instanceof String && expected instanceof String) {
            return actual.equals(expected);
        }
        return false; // containers never equal a scalar; a string never equals a number
    }

    private static boolean isNumber(Object v) {
        return v instanceof Long || v instanceof BigInteger || v instanceof Decimal;
    }

    private static BigDecimal exact(Object n) {
        if (n instanceof Long) {
            return BigDecimal.valueOf((Long) n);
        }
        if (n instanceof BigInteger) {
            return new BigDecimal((BigInteger) n);
        }
        return new BigDecimal(((Decimal) n).value); // the exact binary value, as Python compares
    }

    // ------------------------------------------------------------------------------------------ output

    /** {@code orjson.dumps(value).decode()}. */
    public static String dumps(Object value) {
        StringBuilder out = new StringBuilder(64);
        write(out, value);
        return out.toString();
    }

    @SuppressWarnings("unchecked")
    static void write(StringBuilder out, Object v) {
        if (v == null) {
            out.append("null");
        } else if (v instanceof String) {
            string(out, (String) v);
        } else if (v instanceof Boolean) {
            out.append(((Boolean) v) ? "true" : "false");
        } else if (v instanceof Map) {
            out.append('{');
            boolean first = true;
            for (Map.Entry<String, Object> e : ((Map<String, Object>) v).entrySet()) {
                if (!first) {
                    out.append(',');
                }
                first = false;
                string(out, e.getKey());
                out.append(':');
                write(out, e.getValue());
            }
            out.append('}');
        } else if (v instanceof List) {
            out.append('[');
            boolean first = true;
            for (Object item : (List<Object>) v) {
                if (!first) {
                    out.append(',');
                }
                first = false;
                write(out, item);
            }
            out.append(']');
        } else {
            out.append(v.toString()); // Long, BigInteger, Decimal (its literal)
        }
    }

    private static final char[] HEX = "0123456789abcdef".toCharArray();

    /** A JSON string with orjson's escapes: short ones for \" \\ \n \r \t \b \f, {@code \\u00xx} for other controls. */
    static void string(StringBuilder out, String s) {
        out.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"':
                    out.append("\\\"");
                    break;
                case '\\':
                    out.append("\\\\");
                    break;
                case '\n':
                    out.append("\\n");
                    break;
                case '\r':
                    out.append("\\r");
                    break;
                case '\t':
                    out.append("\\t");
                    break;
                case '\b':
                    out.append("\\b");
                    break;
                case '\f':
                    out.append("\\f");
                    break;
                default:
                    if (c < 0x20) {
                        out.append("\\u00").append(HEX[c >> 4]).append(HEX[c & 0xf]);
                    } else {
                        out.append(c);
                    }
            }
        }
        out.append('"');
    }

    /** Write a value with a Jackson generator (numbers with a fraction keep their literal). */
    @SuppressWarnings("unchecked")
    static void generate(JsonGenerator g, Object v) throws IOException {
        if (v == null) {
            g.writeNull();
        } else if (v instanceof String) {
            g.writeString((String) v);
        } else if (v instanceof Boolean) {
            g.writeBoolean((Boolean) v);
        } else if (v instanceof Long) {
            g.writeNumber((Long) v);
        } else if (v instanceof BigInteger) {
            g.writeNumber((BigInteger) v);
        } else if (v instanceof Decimal) {
            g.writeNumber(((Decimal) v).literal);
        } else if (v instanceof Map) {
            g.writeStartObject();
            for (Map.Entry<String, Object> e : ((Map<String, Object>) v).entrySet()) {
                g.writeFieldName(e.getKey());
                generate(g, e.getValue());
            }
            g.writeEndObject();
        } else if (v instanceof List) {
            g.writeStartArray();
            for (Object item : (List<Object>) v) {
                generate(g, item);
            }
            g.writeEndArray();
        } else {
            throw new IllegalArgumentException("not a JSON value: " + v.getClass());
        }
    }
}
