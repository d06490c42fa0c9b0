/*
 * ScoreDecoder.java: decode tickscore's Score messages in Java (11+), no library.
 *
 * The layout is fixed (README, "Wire format (for subscribers)"), so ScoreDecoder.decode
 * reads one payload (the second frame of a ZeroMQ message, or an Aeron message) in
 * place, bounds-checked, into a reusable Score: no MessagePack library, and per message
 * no allocation unless the instrument or the model version differs from the previous
 * Score's (then a String and a copy of its bytes). One decoder per thread. With JeroMQ:
 *
 *     ZMQ.Socket sub = ctx.createSocket(SocketType.SUB);
 *     sub.connect("tcp://HOST:5556"); sub.subscribe(ZMQ.SUBSCRIPTION_ALL);
 *     ScoreDecoder dec = new ScoreDecoder();
 *     ScoreDecoder.Score s = new ScoreDecoder.Score();
 *     byte[] topic = sub.recv(), payload = sub.recv();
 *     int err = dec.decode(payload, 0, payload.length, s);   // 0 = ok, else ERR_*
 *
 * Built as it is (javac ScoreDecoder.java; java ScoreDecoder < records), it reads records
 * (uint32 little-endian length, then the payload) from stdin and prints one line per record,
 * the same lines as engine/examples/score_sub.c (the tests feed both the same payloads):
 *   ok SCHEMA INSTRUMENT_HEX SEQ TS_EVENT TS_IN TS_OUT SCORE_BITS_HEX VERSION_HEX FLAGS SHARD EPOCH
 *   err CODE NAME
 * seq, flags, shard and epoch are unsigned 64-bit (Long.toUnsignedString prints them).
 */
import java.io.BufferedOutputStream;
import java.io.DataInputStream;
import java.io.EOFException;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

public final class ScoreDecoder {
    public static final int OK = 0;
    public static final int ERR_TRUNCATED = -1; // the payload ends inside an item
    public static final int ERR_NOT_ARRAY = -2; // not a MessagePack array
    public static final int ERR_SCHEMA = -3; // the first element is not schema id 3 (Score) or 2 (Score v1)
    public static final int ERR_LENGTH = -4; // not 11 elements (schema 3) or 9 (schema 2)
    public static final int ERR_TYPE = -5; // an element of the wrong type, or a str not UTF-8
    public static final int ERR_RANGE = -6; // a negative seq/flags/shard/epoch, or a time beyond int64
    public static final int ERR_TRAILING = -7; // bytes after the array

    private static final String[] NAMES = {"ok", "truncated", "not_array", "schema", "length", "type", "range",
        "trailing"};

    public static String errorName(int e) {
        return e <= 0 && e >= ERR_TRAILING ? NAMES[-e] : "unknown";
    }

    /** One decoded Score (reused: decode overwrites every field). */
    public static final class Score {
        public int schema; // 3, or 2 (Score v1: shard and epoch read as 0)
        public String instrument;
        public long seq; // unsigned
        public long tsEventNs, tsInNs, tsOutNs;
        public double score;
        public String modelVersion;
        public long flags, shard, epoch; // unsigned
        // where the strings' UTF-8 bytes are in the payload last decoded
        public int instrumentOff, instrumentLen, versionOff, versionLen;
        // copies of the strings' bytes, to make a new String only when they change
        private byte[] instBytes = new byte[0], verBytes = new byte[0];
    }

    /** A decoding error (preallocated, no stack trace: an error allocates nothing either). */
    private static final class Bad extends Exception {
        private static final long serialVersionUID = 1L;
        final int code;

        Bad(int code) {
            super(null, null, false, false);
            this.code = code;
        }
    }

    private static final Bad TRUNCATED = new Bad(ERR_TRUNCATED), TYPE = new Bad(ERR_TYPE),
            RANGE = new Bad(ERR_RANGE);

    private byte[] b;
    private int p, end;
    // the last integer read: its value, and whether it is negative (then signed in value)
    private long value;
    private boolean negative;

    private int take(int n) throws Bad {
        if (n < 0 || end - p < n) throw TRUNCATED;
        int at = p;
        p += n;
        return at;
    }

    private long be(int at, int n) {
        long v = 0;
        for (int i = 0; i < n; i++) v = v << 8 | (b[at + i] & 0xff);
        return v;
    }

    private void readInt() throws Bad {
        int tag = b[take(1)] & 0xff;
        negative = false;
        if (tag <= 0x7f) {
            value = tag;
        } else if (tag >= 0xe0) {
            value = (byte) tag;
            negative = true;
        } else if (tag >= 0xcc && tag <= 0xcf) { // uint 8, 16, 32, 64
            int n = 1 << (tag - 0xcc);
            value = be(take(n), n);
        } else if (tag >= 0xd0 && tag <= 0xd3) { // int 8, 16, 32, 64
            int n = 1 << (tag - 0xd0);
            long v = be(take(n), n);
            int shift = 64 - 8 * n;
            value = (v << shift) >> shift; // sign-extend
            negative = value < 0;
        } else {
            throw TYPE;
        }
    }

    private long readUint() throws Bad {
        readInt();
        if (negative) throw RANGE;
        return value; // unsigned
    }

    private long readInt64() throws Bad {
        readInt();
        if (!negative && value < 0) throw RANGE; // a uint 64 above Long.MAX_VALUE
        return value;
    }

    /** Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. */
    private static boolean utf8Ok(byte[] s, int off, int n) {
        int k = 0;
        while (k < n) {
            int c = s[off + k] & 0xff, len, cp;
            if (c < 0x80) {
                k++;
                continue;
            } else if (c >= 0xc2 && c <= 0xdf) {
                len = 2;
                cp = c & 0x1f;
            } else if (c >= 0xe0 && c <= 0xef) {
                len = 3;
                cp = c & 0x0f;
            } else if (c >= 0xf0 && c <= 0xf4) {
                len = 4;
                cp = c & 0x07;
            } else {
                return false;
            }
            if (n - k < len) return false;
            for (int j = 1; j < len; j++) {
                int d = s[off + k + j] & 0xff;
                if ((d & 0xc0) != 0x80) return false;
                cp = cp << 6 | (d & 0x3f);
            }
            if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)))
                    || (len == 4 && (cp < 0x10000 || cp > 0x10ffff))) return false;
            k += len;
        }
        return true;
    }

    /** A str item: returns its offset; its length in {@code value}. */
    private int readStr() throws Bad {
        int tag = b[take(1)] & 0xff;
        long n;
        if (tag >= 0xa0 && tag <= 0xbf) {
            n = tag & 0x1f;
        } else if (tag >= 0xd9 && tag <= 0xdb) { // str 8, 16, 32
            int w = 1 << (tag - 0xd9);
            n = be(take(w), w);
        } else {
            throw TYPE;
        }
        if (n > end - p) throw TRUNCATED;
        int at = take((int) n);
        if (!utf8Ok(b, at, (int) n)) throw TYPE;
        value = n;
        return at;
    }

    private double readFloat() throws Bad {
        int tag = b[take(1)] & 0xff;
        if (tag == 0xcb) return Double.longBitsToDouble(be(take(8), 8)); // float 64, what tickscore writes
        if (tag == 0xca) return Float.intBitsToFloat((int) be(take(4), 4)); // float 32, as MessagePack allows
        throw TYPE;
    }

    private static boolean sameBytes(byte[] last, byte[] buf, int off, int n) {
        if (last.length != n) return false;
        for (int i = 0; i < n; i++) if (last[i] != buf[off + i]) return false;
        return true;
    }

    /** Decode the Score in {@code buf[off, off + len)} into {@code s}; return OK or an ERR_* code. */
    public int decode(byte[] buf, int off, int len, Score s) {
        b = buf;
        p = off;
        end = off + len;
        try {
            int tag = buf[take(1)] & 0xff;
            long count;
            if (tag >= 0x90 && tag <= 0x9f) {
                count = tag & 0x0f;
            } else if (tag == 0xdc || tag == 0xdd) { // array 16, 32
                int w = tag == 0xdc ? 2 : 4;
                count = be(take(w), w);
            } else {
                return ERR_NOT_ARRAY;
            }
            if (count == 0) return ERR_LENGTH;
            long schema;
            try {
                schema = readUint();
            } catch (Bad e) {
                return e.code == ERR_TRUNCATED ? ERR_TRUNCATED : ERR_SCHEMA;
            }
            if (schema != 3 && schema != 2) return ERR_SCHEMA;
            if (count != (schema == 3 ? 11 : 9)) return ERR_LENGTH;
            int instOff = readStr(), instLen = (int) value;
            long seq = readUint();
            long tEvent = readInt64(), tIn = readInt64(), tOut = readInt64();
            double score = readFloat();
            int verOff = readStr(), verLen = (int) value;
            long flags = readUint(), shard = 0, epoch = 0;
            if (schema == 3) {
                shard = readUint();
                epoch = readUint();
            }
            if (p != end) return ERR_TRAILING;
            // a new String only when the bytes differ from the previous Score's
            if (s.instrument == null || !sameBytes(s.instBytes, buf, instOff, instLen)) {
                s.instBytes = Arrays.copyOfRange(buf, instOff, instOff + instLen);
                s.instrument = new String(buf, instOff, instLen, StandardCharsets.UTF_8);
            }
            if (s.modelVersion == null || !sameBytes(s.verBytes, buf, verOff, verLen)) {
                s.verBytes = Arrays.copyOfRange(buf, verOff, verOff + verLen);
                s.modelVersion = new String(buf, verOff, verLen, StandardCharsets.UTF_8);
            }
            s.schema = (int) schema;
            s.instrumentOff = instOff;
            s.instrumentLen = instLen;
            s.versionOff = verOff;
            s.versionLen = verLen;
            s.seq = seq;
            s.tsEventNs = tEvent;
            s.tsInNs = tIn;
            s.tsOutNs = tOut;
            s.score = score;
            s.flags = flags;
            s.shard = shard;
            s.epoch = epoch;
            return OK;
        } catch (Bad e) {
            return e.code;
        } finally {
            b = null; // hold no reference to the caller's buffer
        }
    }

    private static void hex(StringBuilder sb, byte[] b, int off, int n) {
        if (n == 0) sb.append('-');
        for (int i = 0; i < n; i++) {
            int v = b[off + i] & 0xff;
            sb.append(Character.forDigit(v >> 4, 16)).append(Character.forDigit(v & 15, 16));
        }
    }

    /** Records from stdin (uint32 little-endian length, payload), one line each. */
    public static void main(String[] args) throws IOException {
        DataInputStream in = new DataInputStream(System.in);
        PrintStream out = new PrintStream(new BufferedOutputStream(System.out, 1 << 16), false, "UTF-8");
        ScoreDecoder dec = new ScoreDecoder();
        Score s = new Score();
        byte[] h = new byte[4];
        StringBuilder sb = new StringBuilder();
        while (true) {
            try {
                in.readFully(h);
            } catch (EOFException e) {
                break;
            }
            long n = (h[0] & 0xffL) | (h[1] & 0xffL) << 8 | (h[2] & 0xffL) << 16 | (h[3] & 0xffL) << 24;
            if (n > 1 << 24) throw new IOException("bad record length " + n);
            byte[] buf = new byte[(int) n];
            in.readFully(buf);
            int e = dec.decode(buf, 0, buf.length, s);
            sb.setLength(0);
            if (e != OK) {
                sb.append("err ").append(e).append(' ').append(errorName(e));
            } else {
                sb.append("ok ").append(s.schema).append(' ');
                byte[] inst = s.instrument.getBytes(StandardCharsets.UTF_8); // the String, as decoded
                hex(sb, inst, 0, inst.length);
                sb.append(' ').append(Long.toUnsignedString(s.seq)).append(' ').append(s.tsEventNs).append(' ')
                        .append(s.tsInNs).append(' ').append(s.tsOutNs).append(' ');
                String bits = Long.toHexString(Double.doubleToRawLongBits(s.score));
                for (int i = bits.length(); i < 16; i++) sb.append('0');
                sb.append(bits).append(' ');
                byte[] ver = s.modelVersion.getBytes(StandardCharsets.UTF_8);
                hex(sb, ver, 0, ver.length);
                sb.append(' ').append(Long.toUnsignedString(s.flags)).append(' ')
                        .append(Long.toUnsignedString(s.shard)).append(' ').append(Long.toUnsignedString(s.epoch));
            }
            out.println(sb);
        }
        out.flush();
    }
}
