/*
 * _login_columns: the processor's hot path, "record values -> window counts",
 * in C and without the GIL.
 *
 * Why this exists: per record, Python's work (decode, take fields out, trim,
 * one str per device id and IP, a set and a Counter update) cost several times
 * the raw consume rate's budget (README, Performance). Here a partition run of
 * values is parsed into plain C rows (parse_batch -> LoginBatch) and folded
 * into a window's hash tables keyed by the values' bytes (WindowTallies.add):
 * no Python object per record, and the GIL is released for both loops, so the
 * poll loop's next consume() and the window closer can run meanwhile.
 * Which window, lateness, watermarks and offsets stay in Python
 * (aggregator.py), decided once per batch.
 *
 * The rule that keeps it safe: this parser never decides that a record is
 * invalid, and never guesses. It accepts only a strict subset of JSON that it
 * understands completely:
 *
 *   - one object, optional JSON white space around it and between tokens;
 *   - keys and string values of printable ASCII (0x20..0x7E) with no
 *     backslash (so no escapes and no Unicode questions);
 *   - values that are such strings, integers of at most 18 digits, true,
 *     false or null.
 *
 * Anything else (nested values, floats, escapes, non-ASCII, control bytes,
 * malformed JSON, a value that is not an object, a timestamp string that is
 * not plain digits) is *deferred*: ingest/parsing.py decodes it with the exact rules
 * and sets the row's values (LoginBatch.set_record) or marks it invalid.
 *
 * For accepted records the contract's rules are applied here:
 *   - string fields: trimmed (only ' ' can surround a printable-ASCII value);
 *     empty after trimming, longer than max_field_length, or not a string
 *     -> missing; user_id only as "missing or not" (no aggregate reads it);
 *   - timestamp: an integer, or a string of plain digits -> seconds
 *     (milliseconds above 10^12); not a time (absent, null, true, false, <= 0,
 *     more than the allowed skew ahead of the record's own Kafka timestamp)
 *     -> the Kafka timestamp, which Python supplies (LoginBatch.set_fallback_time);
 *   - a key given twice: the last one counts (as msgspec and json.loads do).
 *
 * core.window_value.WindowTallies is the pure-Python twin of WindowTallies; the tests
 * hold the two paths to the same window values on generated input
 * (tests/test_parsing.py, tests/test_aggregator.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "scan_plain_string reads words little-endian"
#endif
#include <stdlib.h>
#include <string.h>

enum {
    F_USER_ID,
    F_APP_VERSION,
    F_DEVICE_TYPE,
    F_IP,
    F_LOCALE,
    F_DEVICE_ID,
    N_STRING_FIELDS,
    F_TIMESTAMP = N_STRING_FIELDS,
    N_FIELDS
};

static const char *const FIELD_NAMES[N_FIELDS] = {
    "user_id", "app_version", "device_type", "ip", "locale", "device_id", "timestamp",
};

enum { V_ABSENT, V_STRING, V_INTEGER, V_LITERAL };

typedef struct {
    int kind;
    const char *text; /* V_STRING: the characters between the quotes */
    Py_ssize_t length;
    long long integer; /* V_INTEGER */
} FieldValue;

static inline int is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static inline const char *skip_space(const char *p, const char *end) {
    while (p < end && is_json_space(*p)) p++;
    return p;
}

/* PLAIN[c]: c may appear in a string body of the subset (printable ASCII, not '"' or '\\'). */
static unsigned char PLAIN[256];

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* Nonzero when some byte of w is zero (exact as a yes/no answer). */
static inline uint64_t has_zero_byte(uint64_t w) { return (w - ONES) & ~w & HIGHS; }

/* Nonzero when some byte of w is not PLAIN: below 0x20, 0x7F or above, '"' or '\\'. */
static inline uint64_t has_special_byte(uint64_t w) {
    return ((w - ONES * 0x20) & ~w & HIGHS) | (w & HIGHS) | has_zero_byte(w ^ (ONES * 0x7F)) |
           has_zero_byte(w ^ (ONES * '"')) | has_zero_byte(w ^ (ONES * '\\'));
}

/* A string's body after its opening quote. Returns the closing quote, or NULL to defer.
   Eight bytes at a time: the lowest flagged byte of has_special_byte is always a
   truly special one (borrows only run upwards), so the first byte that is not
   PLAIN is found exactly; within 8 bytes of the end, byte by byte. */
static inline const char *scan_plain_string(const char *p, const char *end) {
    while (end - p >= 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* little-endian: the lowest byte is the first in memory */
        uint64_t special = has_special_byte(w);
        if (special) {
            p += __builtin_ctzll(special) >> 3;
            return *p == '"' ? p : NULL;
        }
        p += 8;
    }
    while (p < end && PLAIN[(unsigned char)*p]) p++;
    return p < end && *p == '"' ? p : NULL;
}

static inline int field_of_key(const char *key, Py_ssize_t length) {
    int f;
    switch (length) { /* at most one candidate per length and first letter */
    case 2: f = F_IP; break;
    case 6: f = F_LOCALE; break;
    case 7: f = F_USER_ID; break;
    case 9: f = key[0] == 'd' ? F_DEVICE_ID : F_TIMESTAMP; break;
    case 11: f = key[0] == 'a' ? F_APP_VERSION : F_DEVICE_TYPE; break;
    default: return -1;
    }
    return memcmp(FIELD_NAMES[f], key, (size_t)length) == 0 ? f : -1;
}

/* Parse one record into fields[]. Returns 1 when the record is in the subset, 0 to defer. */
static int parse_record(const char *p, const char *end, FieldValue fields[N_FIELDS]) {
    for (int f = 0; f < N_FIELDS; f++) fields[f].kind = V_ABSENT;
    p = skip_space(p, end);
    if (p >= end || *p != '{') return 0;
    p = skip_space(p + 1, end);
    if (p < end && *p == '}') {
        p++;
        goto after_object;
    }
    for (;;) {
        if (p >= end || *p != '"') return 0;
        const char *key = p + 1;
        const char *key_end = scan_plain_string(key, end);
        if (key_end == NULL) return 0;
        p = skip_space(key_end + 1, end);
        if (p >= end || *p != ':') return 0;
        p = skip_space(p + 1, end);
        if (p >= end) return 0;

        FieldValue value = {V_LITERAL, NULL, 0, 0};
        char c = *p;
        if (c == '"') {
            const char *text_end = scan_plain_string(p + 1, end);
            if (text_end == NULL) return 0;
            value.kind = V_STRING;
            value.text = p + 1;
            value.length = text_end - (p + 1);
            p = text_end + 1;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            int negative = c == '-';
            if (negative) p++;
            if (p >= end || *p < '0' || *p > '9') return 0;
            const char *digits = p;
            long long number = 0;
            if (*p == '0') {
                p++;
            } else {
                while (p < end && *p >= '0' && *p <= '9') {
                    if (p - digits >= 18) return 0; /* beyond int64 safety: exact path */
                    number = number * 10 + (*p - '0');
                    p++;
                }
            }
            /* a fraction or an exponent: a float, left to the exact path */
            if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) return 0;
            value.kind = V_INTEGER;
            value.integer = negative ? -number : number;
        } else if (c == 't' && end - p >= 4 && memcmp(p, "true", 4) == 0) {
            p += 4;
        } else if (c == 'f' && end - p >= 5 && memcmp(p, "false", 5) == 0) {
            p += 5;
        } else if (c == 'n' && end - p >= 4 && memcmp(p, "null", 4) == 0) {
            p += 4;
        } else {
            return 0; /* objects, arrays, anything malformed */
        }
        int field = field_of_key(key, key_end - key);
        if (field >= 0) fields[field] = value; /* a repeated key: the last one counts */

        p = skip_space(p, end);
        if (p >= end) return 0;
        if (*p == ',') {
            p = skip_space(p + 1, end);
            continue;
        }
        if (*p == '}') {
            p++;
            break;
        }
        return 0;
    }
after_object:
    p = skip_space(p, end);
    return p == end;
}

/* ---- the contract's field rules, for an accepted record ---------------------------- */

/* The value as the contract uses it: trimmed (only ' ' can surround printable
   ASCII); NULL when it is missing (not a string, empty, or too long). */
static const char *trimmed_string(const FieldValue *value, Py_ssize_t max_length, Py_ssize_t *length_out) {
    if (value->kind != V_STRING) return NULL;
    const char *text = value->text;
    Py_ssize_t length = value->length;
    while (length > 0 && text[0] == ' ') {
        text++;
        length--;
    }
    while (length > 0 && text[length - 1] == ' ') length--;
    if (length == 0 || length > max_length) return NULL;
    *length_out = length;
    return text;
}

/* The string fields a window counts, in the order a Row keeps them. */
enum { K_DEVICE_TYPE, K_APP_VERSION, K_LOCALE, K_IP, K_DEVICE_ID, N_KEPT };
static const int KEPT_FIELD[N_KEPT] = {F_DEVICE_TYPE, F_APP_VERSION, F_LOCALE, F_IP, F_DEVICE_ID};

enum { ROW_VALID, ROW_DEFERRED, ROW_INVALID };

/* One record as the windows need it: no Python object, so a whole batch is
   parsed and counted without the GIL. Texts point into the batch's values (or
   into bytes the batch owns, for records set from Python). */
typedef struct {
    const char *text[N_KEPT];
    uint32_t length[N_KEPT]; /* 0: missing */
    int64_t event_time;      /* valid once has_time */
    uint8_t state;
    uint8_t has_time;
    uint8_t user_id_missing;
    uint8_t timestamp_missing; /* its event time is the Kafka timestamp */
} Row;

#define MILLISECONDS_ABOVE 1000000000000LL

/* An integer timestamp under the contract's rule: seconds, or milliseconds above
   10^12; not a time when <= 0 or more than the allowed skew ahead of `now`, the
   record's Kafka time (parsing.kafka_time_of) when parse_batch is given them. */
static int usable_time(long long value, double now, double max_skew, int64_t *seconds) {
    if (value > MILLISECONDS_ABOVE) value /= 1000;
    if (value <= 0 || (double)value > now + max_skew) return 0;
    *seconds = value;
    return 1;
}

/* A timestamp sent as a string of plain digits ("1700000000", " +17 "), as the
   numeric-string rule reads it. Returns 0 for anything else (floats, exponents,
   over 18 digits): the row is then deferred to the exact Python rule. */
static int digits_string(const FieldValue *value, long long *number) {
    const char *p = value->text, *end = value->text + value->length;
    while (p < end && *p == ' ') p++;
    while (end > p && end[-1] == ' ') end--;
    int negative = 0;
    if (p < end && (*p == '+' || *p == '-')) negative = *p++ == '-';
    if (p == end || end - p > 18) return 0;
    long long result = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9') return 0;
        result = result * 10 + (*p - '0');
    }
    *number = negative ? -result : result;
    return 1;
}

/* Fill a row from an accepted record. Returns 0 when a value needs the exact
   Python rule after all (a timestamp string that is not plain digits). */
static int fill_row(Row *row, const FieldValue fields[N_FIELDS], Py_ssize_t max_length, double now, double max_skew) {
    for (int k = 0; k < N_KEPT; k++) {
        Py_ssize_t length = 0;
        const char *text = trimmed_string(&fields[KEPT_FIELD[k]], max_length, &length);
        row->text[k] = text;
        row->length[k] = text == NULL ? 0 : (uint32_t)length;
    }
    Py_ssize_t ignored;
    row->user_id_missing = trimmed_string(&fields[F_USER_ID], max_length, &ignored) == NULL;
    const FieldValue *timestamp = &fields[F_TIMESTAMP];
    long long number = 0;
    int is_number = timestamp->kind == V_INTEGER;
    if (is_number) {
        number = timestamp->integer;
    } else if (timestamp->kind == V_STRING) {
        if (!digits_string(timestamp, &number)) return 0;
        is_number = 1;
    }
    /* absent, null, true, false, or out of range: the Kafka timestamp (set later) */
    row->has_time = is_number && usable_time(number, now, max_skew, &row->event_time);
    row->timestamp_missing = !row->has_time;
    row->state = ROW_VALID;
    return 1;
}

/* ---- LoginBatch -------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *values; /* tuple: keeps every text a row points into alive */
    PyObject *owned;  /* list of bytes: texts of rows set from Python */
    Row *rows;
    Py_ssize_t count;
    Py_ssize_t valid;   /* rows in state ROW_VALID */
    Py_ssize_t pending; /* rows still deferred, or valid without an event time */
} LoginBatch;

static PyTypeObject LoginBatchType;

static void LoginBatch_dealloc(LoginBatch *self) {
    PyMem_RawFree(self->rows);
    Py_XDECREF(self->values);
    Py_XDECREF(self->owned);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t LoginBatch_len(LoginBatch *self) { return self->valid; }

/* Every row decided and every valid row timed: what counting a batch needs. */
static int batch_is_complete(LoginBatch *self) {
    if (self->pending == 0) return 1;
    for (Py_ssize_t i = 0; i < self->count; i++) { /* only to name the row in the error */
        const Row *row = &self->rows[i];
        if (row->state == ROW_DEFERRED || (row->state == ROW_VALID && !row->has_time)) {
            PyErr_Format(PyExc_ValueError, "row %zd has no %s yet", i,
                         row->state == ROW_DEFERRED ? "values (deferred)" : "event time (fallback)");
            return 0;
        }
    }
    return 1;
}

static int row_index(LoginBatch *self, Py_ssize_t row) {
    if (row < 0 || row >= self->count) {
        PyErr_SetString(PyExc_IndexError, "row out of range");
        return 0;
    }
    return 1;
}

static PyObject *rows_where(LoginBatch *self, int deferred) {
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        const Row *row = &self->rows[i];
        int wanted = deferred ? row->state == ROW_DEFERRED : row->state == ROW_VALID && !row->has_time;
        if (!wanted) continue;
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyList_Append(list, index) < 0) {
            Py_XDECREF(index);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(index);
    }
    return list;
}

static PyObject *LoginBatch_deferred(LoginBatch *self, PyObject *unused) {
    (void)unused;
    return rows_where(self, 1);
}

static PyObject *LoginBatch_fallback_rows(LoginBatch *self, PyObject *unused) {
    (void)unused;
    return rows_where(self, 0);
}

static PyObject *LoginBatch_set_record(LoginBatch *self, PyObject *args) {
    Py_ssize_t index;
    int user_id_missing;
    PyObject *texts[N_KEPT];
    PyObject *event_time;
    if (!PyArg_ParseTuple(args, "npUUUUUO:set_record", &index, &user_id_missing, &texts[K_DEVICE_TYPE],
                          &texts[K_APP_VERSION], &texts[K_LOCALE], &texts[K_IP], &texts[K_DEVICE_ID], &event_time))
        return NULL;
    if (!row_index(self, index)) return NULL;
    Row *row = &self->rows[index];
    if (row->state != ROW_DEFERRED) {
        PyErr_Format(PyExc_ValueError, "row %zd was not deferred", index);
        return NULL;
    }
    long long seconds = 0;
    if (event_time != Py_None) {
        seconds = PyLong_AsLongLong(event_time);
        if (seconds == -1 && PyErr_Occurred()) return NULL;
    }
    for (int k = 0; k < N_KEPT; k++) {
        /* surrogatepass: a JSON "\ud800" is a str with a lone surrogate; its bytes
           must still be one distinct key, and decode back to the same str. */
        PyObject *encoded = PyUnicode_AsEncodedString(texts[k], "utf-8", "surrogatepass");
        if (encoded == NULL) return NULL;
        int failed = PyList_Append(self->owned, encoded);
        Py_DECREF(encoded);
        if (failed) return NULL;
        Py_ssize_t length = PyBytes_GET_SIZE(encoded);
        if (length > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "value too long");
            return NULL;
        }
        row->text[k] = length ? PyBytes_AS_STRING(encoded) : NULL;
        row->length[k] = (uint32_t)length;
    }
    row->user_id_missing = (uint8_t)user_id_missing;
    row->has_time = event_time != Py_None;
    row->event_time = seconds;
    row->timestamp_missing = !row->has_time;
    row->state = ROW_VALID;
    self->valid++;
    if (row->has_time) self->pending--; /* else it now waits for its fallback time */
    Py_RETURN_NONE;
}

static PyObject *LoginBatch_set_invalid(LoginBatch *self, PyObject *arg) {
    Py_ssize_t index = PyLong_AsSsize_t(arg);
    if (index == -1 && PyErr_Occurred()) return NULL;
    if (!row_index(self, index)) return NULL;
    Row *row = &self->rows[index];
    if (row->state != ROW_DEFERRED) {
        PyErr_Format(PyExc_ValueError, "row %zd was not deferred", index);
        return NULL;
    }
    row->state = ROW_INVALID;
    self->pending--;
    Py_RETURN_NONE;
}

static PyObject *LoginBatch_set_fallback_time(LoginBatch *self, PyObject *args) {
    Py_ssize_t index;
    long long seconds;
    if (!PyArg_ParseTuple(args, "nL:set_fallback_time", &index, &seconds)) return NULL;
    if (!row_index(self, index)) return NULL;
    Row *row = &self->rows[index];
    if (row->state != ROW_VALID || row->has_time) {
        PyErr_Format(PyExc_ValueError, "row %zd does not need a fallback time", index);
        return NULL;
    }
    row->event_time = seconds;
    row->has_time = 1;
    self->pending--;
    Py_RETURN_NONE;
}

static inline int64_t window_start_of(int64_t seconds, int64_t width) {
    int64_t offset = seconds % width;
    if (offset < 0) offset += width;
    return seconds - offset;
}

static PyObject *LoginBatch_window_counts(LoginBatch *self, PyObject *arg) {
    long long width = PyLong_AsLongLong(arg);
    if (width == -1 && PyErr_Occurred()) return NULL;
    if (width <= 0) {
        PyErr_SetString(PyExc_ValueError, "width must be positive");
        return NULL;
    }
    if (!batch_is_complete(self)) return NULL;
    /* A batch is one partition's run: nearly always one or two windows. */
    int64_t *starts = NULL, *counts = NULL;
    Py_ssize_t used = 0, capacity = 0, last = -1;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        const Row *row = &self->rows[i];
        if (row->state != ROW_VALID) continue;
        int64_t start = window_start_of(row->event_time, width);
        if (last < 0 || starts[last] != start) {
            for (last = 0; last < used && starts[last] != start; last++) {
            }
            if (last == used) {
                if (used == capacity) {
                    capacity = capacity ? capacity * 2 : 4;
                    int64_t *grown_starts = PyMem_Realloc(starts, (size_t)capacity * sizeof(int64_t));
                    if (grown_starts != NULL) starts = grown_starts;
                    int64_t *grown_counts = grown_starts ? PyMem_Realloc(counts, (size_t)capacity * sizeof(int64_t)) : NULL;
                    if (grown_counts == NULL) {
                        PyErr_NoMemory();
                        goto done;
                    }
                    counts = grown_counts;
                }
                starts[used] = start;
                counts[used] = 0;
                used++;
            }
        }
        counts[last]++;
    }
    result = PyDict_New();
    if (result == NULL) goto done;
    for (Py_ssize_t w = 0; w < used; w++) {
        PyObject *key = PyLong_FromLongLong(starts[w]);
        PyObject *value = PyLong_FromLongLong(counts[w]);
        int failed = key == NULL || value == NULL || PyDict_SetItem(result, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed) {
            Py_CLEAR(result);
            goto done;
        }
    }
done:
    PyMem_Free(starts);
    PyMem_Free(counts);
    return result;
}

static PyObject *LoginBatch_newest_time(LoginBatch *self, PyObject *unused) {
    (void)unused;
    if (!batch_is_complete(self)) return NULL;
    int found = 0;
    int64_t newest = 0;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        const Row *row = &self->rows[i];
        if (row->state != ROW_VALID) continue;
        if (!found || row->event_time > newest) newest = row->event_time;
        found = 1;
    }
    if (!found) Py_RETURN_NONE;
    return PyLong_FromLongLong(newest);
}

static PyMethodDef LoginBatch_methods[] = {
    {"deferred", (PyCFunction)LoginBatch_deferred, METH_NOARGS,
     "Rows outside the native subset: decode them in Python, then set_record or set_invalid."},
    {"set_record", (PyCFunction)LoginBatch_set_record, METH_VARARGS,
     "set_record(row, user_id_missing, device_type, app_version, locale, ip, device_id, event_time):\n"
     "a deferred row's values after the exact rules (\"\" missing; event_time None: use the fallback)."},
    {"set_invalid", (PyCFunction)LoginBatch_set_invalid, METH_O, "A deferred row is not a valid record."},
    {"fallback_rows", (PyCFunction)LoginBatch_fallback_rows, METH_NOARGS,
     "Valid rows without a usable event time: give each one with set_fallback_time."},
    {"set_fallback_time", (PyCFunction)LoginBatch_set_fallback_time, METH_VARARGS,
     "set_fallback_time(row, seconds): the Kafka timestamp of a row without a usable event time."},
    {"window_counts", (PyCFunction)LoginBatch_window_counts, METH_O,
     "window_counts(width) -> {window start: valid rows in it}"},
    {"newest_time", (PyCFunction)LoginBatch_newest_time, METH_NOARGS, "The highest event time, or None."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods LoginBatch_sequence = {.sq_length = (lenfunc)LoginBatch_len};

static PyTypeObject LoginBatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_login_columns.LoginBatch",
    .tp_doc = "One partition run of record values, parsed; made by parse_batch.",
    .tp_basicsize = sizeof(LoginBatch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)LoginBatch_dealloc,
    .tp_as_sequence = &LoginBatch_sequence,
    .tp_methods = LoginBatch_methods,
};

PyDoc_STRVAR(parse_batch_doc,
             "parse_batch(values, max_field_length, now, max_skew_seconds[, kafka]) -> LoginBatch\n\n"
             "Parses every value without the GIL. Records outside the native subset are\n"
             "deferred (batch.deferred()); records without a usable event time wait for\n"
             "their Kafka timestamp (batch.fallback_rows()). `kafka`, one per value: the\n"
             "records' Kafka times in seconds, or the consumed messages themselves (their\n"
             "timestamp() is read here, capped at now + skew as parsing.kafka_time_of does);\n"
             "an event time more than the skew ahead of its record's Kafka time is not one.\n"
             "Without it, the skew is counted from now (the rule of the release before).");

/* Message.timestamp's C function, found once: calling it directly saves most of the
   cost of a Python-level call per record (the tuple it returns is still made). */
static PyTypeObject *timestamp_owner = NULL;
static PyCFunction timestamp_function = NULL;

/* A record's Kafka time in seconds, as parsing.kafka_time_of reads it: the wall
   clock when it has none, or when it is more than the skew ahead of the clock.
   Returns 0 with an exception set on failure. */
static int kafka_seconds_of(PyObject *item, double now, double max_skew, int64_t *seconds) {
    if (PyLong_Check(item)) {
        long long value = PyLong_AsLongLong(item);
        if (value == -1 && PyErr_Occurred()) return 0;
        *seconds = value;
        return 1;
    }
    PyObject *stamp;
    if (Py_TYPE(item) == timestamp_owner) {
        stamp = timestamp_function(item, NULL);
    } else {
        stamp = PyObject_CallMethod(item, "timestamp", NULL);
        if (timestamp_owner == NULL && stamp != NULL) {
            PyObject *descr = PyObject_GetAttrString((PyObject *)Py_TYPE(item), "timestamp");
            if (descr != NULL && Py_IS_TYPE(descr, &PyMethodDescr_Type) &&
                (((PyMethodDescrObject *)descr)->d_method->ml_flags & METH_NOARGS)) {
                timestamp_function = ((PyMethodDescrObject *)descr)->d_method->ml_meth;
                timestamp_owner = Py_TYPE(item); /* a C type of confluent_kafka: lives as long as we do */
            }
            Py_XDECREF(descr);
            PyErr_Clear();
        }
    }
    if (stamp == NULL) return 0;
    if (!PyTuple_Check(stamp) || PyTuple_GET_SIZE(stamp) != 2) {
        Py_DECREF(stamp);
        PyErr_SetString(PyExc_TypeError, "timestamp() must return (type, milliseconds)");
        return 0;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(stamp, 0));
    long long millis = PyLong_AsLongLong(PyTuple_GET_ITEM(stamp, 1));
    Py_DECREF(stamp);
    if (PyErr_Occurred()) return 0;
    long long whole_now = (long long)now; /* int(now), as kafka_time_of; now > 0 */
    if (kind == 0 || millis <= 0) { /* TIMESTAMP_NOT_AVAILABLE */
        *seconds = whole_now;
        return 1;
    }
    long long value = millis / 1000;
    *seconds = (double)value <= now + max_skew ? value : whole_now;
    return 1;
}

static PyObject *parse_batch(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *values, *kafka = NULL;
    Py_ssize_t max_length;
    double now, max_skew;
    if (!PyArg_ParseTuple(args, "O!ndd|O!:parse_batch", &PyList_Type, &values, &max_length, &now, &max_skew,
                          &PyList_Type, &kafka))
        return NULL;
    if (kafka != NULL && PyList_GET_SIZE(kafka) != PyList_GET_SIZE(values)) {
        PyErr_SetString(PyExc_ValueError, "kafka: one per value");
        return NULL;
    }
    int64_t *references = NULL; /* per record: what its event time may be at most the skew ahead of */
    if (kafka != NULL) {
        references = PyMem_Malloc(sizeof(int64_t) * (size_t)(PyList_GET_SIZE(values) + 1));
        if (references == NULL) return PyErr_NoMemory();
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(kafka); i++) {
            if (!kafka_seconds_of(PyList_GET_ITEM(kafka, i), now, max_skew, &references[i])) {
                PyMem_Free(references);
                return NULL;
            }
        }
    }
    LoginBatch *batch = PyObject_New(LoginBatch, &LoginBatchType);
    if (batch == NULL) {
        PyMem_Free(references);
        return NULL;
    }
    batch->rows = NULL;
    batch->owned = PyList_New(0);
    batch->values = PyList_AsTuple(values);
    batch->count = PyList_GET_SIZE(values);
    batch->valid = 0;
    batch->pending = 0;
    const char **starts = PyMem_Malloc(sizeof(char *) * (size_t)(batch->count + 1));
    Py_ssize_t *lengths = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(batch->count + 1));
    batch->rows = PyMem_RawMalloc(sizeof(Row) * (size_t)(batch->count + 1));
    if (batch->owned == NULL || batch->values == NULL || starts == NULL || lengths == NULL || batch->rows == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        PyMem_Free(starts);
        PyMem_Free(lengths);
        PyMem_Free(references);
        Py_DECREF(batch);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < batch->count; i++) {
        PyObject *item = PyTuple_GET_ITEM(batch->values, i);
        starts[i] = PyBytes_Check(item) ? PyBytes_AS_STRING(item) : NULL; /* None, str...: deferred */
        lengths[i] = starts[i] ? PyBytes_GET_SIZE(item) : 0;
    }
    Py_ssize_t valid = 0, pending = 0;
    Py_BEGIN_ALLOW_THREADS
    FieldValue fields[N_FIELDS];
    for (Py_ssize_t i = 0; i < batch->count; i++) {
        Row *row = &batch->rows[i];
        row->state = ROW_DEFERRED;
        row->has_time = 0;
        double reference = references ? (double)references[i] : now;
        if (starts[i] != NULL && parse_record(starts[i], starts[i] + lengths[i], fields) &&
            fill_row(row, fields, max_length, reference, max_skew))
            valid++;
        else
            row->state = ROW_DEFERRED;
        pending += !row->has_time; /* deferred rows have none yet either */
    }
    Py_END_ALLOW_THREADS
    batch->valid = valid;
    batch->pending = pending;
    PyMem_Free(starts);
    PyMem_Free(lengths);
    PyMem_Free(references);
    return (PyObject *)batch;
}

/* ---- WindowTallies: one window's counts, keyed by the values' bytes ----------------- */

/* An open-addressing hash table of byte strings with a count each. Keys are copied
   into an arena (entries hold offsets, so the arena may move when it grows). The
   hash is CPython's own for bytes (SipHash with the process's random key), so
   crafted values cannot make one window's table degenerate any more than they
   could a Python set.

   An entry is 16 bytes, so that a busy window's device and IP tables take half the memory
   (and cache lines, and page faults) of a 32-byte entry: the count lives in the
   arena, just before the key's bytes, where a hit's comparison reads anyway. An
   arena record is [u64 count][key bytes]; records start at ARENA_START or later,
   so offset 0 marks an empty slot. Only the low 32 bits of the hash are kept:
   they place an entry as long as the table has at most 2^32 slots (beyond that
   table_grow hashes the key again). */
typedef struct {
    uint32_t hash; /* key_hash's low 32 bits */
    uint32_t length;
    uint64_t offset; /* of the key's record in the arena; 0: an empty slot */
} Entry;

#define COUNT_SIZE sizeof(uint64_t)
#define ARENA_START 8

typedef struct {
    Entry *entries;
    size_t mask; /* capacity - 1 (a power of two) */
    size_t used;
    char *arena;
    size_t arena_used, arena_capacity;
    uint64_t grown; /* how many times entries moved (slots seen before are stale) */
} KeyTable;

/* a[0..length) == b[0..length), for the short keys of these tables without a call:
   8 bytes at a time, the last word overlapping (no byte outside either key is read). */
static inline int keys_equal(const char *a, const char *b, size_t length) {
    uint64_t x, y;
    if (length >= 8) {
        size_t at = 0;
        for (; at + 8 < length; at += 8) {
            memcpy(&x, a + at, 8);
            memcpy(&y, b + at, 8);
            if (x != y) return 0;
        }
        memcpy(&x, a + length - 8, 8);
        memcpy(&y, b + length - 8, 8);
        return x == y;
    }
    if (length >= 4) {
        uint32_t u, v, w, z;
        memcpy(&u, a, 4);
        memcpy(&v, b, 4);
        memcpy(&w, a + length - 4, 4);
        memcpy(&z, b + length - 4, 4);
        return u == v && w == z;
    }
    for (size_t i = 0; i < length; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static inline const char *entry_key(const KeyTable *table, const Entry *entry) {
    return table->arena + entry->offset + COUNT_SIZE;
}

static inline uint64_t entry_count(const KeyTable *table, const Entry *entry) {
    uint64_t count;
    memcpy(&count, table->arena + entry->offset, COUNT_SIZE);
    return count;
}

static inline void entry_count_add(KeyTable *table, const Entry *entry, uint64_t n) {
    uint64_t count = entry_count(table, entry) + n;
    memcpy(table->arena + entry->offset, &count, COUNT_SIZE);
}

static int table_init(KeyTable *table, size_t capacity) {
    table->entries = calloc(capacity, sizeof(Entry));
    table->mask = capacity - 1;
    table->used = 0;
    table->arena = NULL;
    table->arena_used = ARENA_START;
    table->arena_capacity = 0;
    table->grown = 0;
    return table->entries == NULL ? -1 : 0;
}

static void table_free(KeyTable *table) {
    free(table->entries);
    free(table->arena);
    table->entries = NULL;
    table->arena = NULL;
}

enum { ADDED, LEFT_OUT, OUT_OF_MEMORY };

/* CPython's SipHash-1-3 (Python/pyhash.c), with the process's key, inlined: the
   same values as _Py_HashBytes, without the call through PyHash_Func, and with the
   last partial word of a key of 8 bytes or more read in one overlapping load.
   Used only when PyInit finds that this interpreter hashes bytes with siphash13 and
   that it gives exactly _Py_HashBytes's values (see hash_is_inlined). */
static int hash_is_inlined;
static uint64_t sip_k0, sip_k1;

#define SIP_ROTATE(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_HALF_ROUND(a, b, c, d, s, t) \
    a += b;                              \
    c += d;                              \
    b = SIP_ROTATE(b, s) ^ a;            \
    d = SIP_ROTATE(d, t) ^ c;            \
    a = SIP_ROTATE(a, 32);
#define SIP_ROUND(v0, v1, v2, v3)              \
    SIP_HALF_ROUND(v0, v1, v2, v3, 13, 16);    \
    SIP_HALF_ROUND(v2, v1, v0, v3, 17, 21);

static inline uint64_t siphash13(const char *key, size_t length) {
    const unsigned char *in = (const unsigned char *)key;
    uint64_t v0 = sip_k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = sip_k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = sip_k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = sip_k1 ^ 0x7465646279746573ULL;
    uint64_t b = (uint64_t)length << 56;
    size_t left = length;
    while (left >= 8) {
        uint64_t m;
        memcpy(&m, in, 8); /* little-endian, as checked at the top */
        in += 8;
        left -= 8;
        v3 ^= m;
        SIP_ROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    uint64_t t = 0;
    if (left > 0) {
        if (length >= 8) { /* the 8 bytes that end the key; keep the last `left` */
            memcpy(&t, in + left - 8, 8);
            t >>= 8 * (8 - left);
        } else {
            for (size_t i = 0; i < left; i++) t |= (uint64_t)in[i] << (8 * i);
        }
    }
    b |= t;
    v3 ^= b;
    SIP_ROUND(v0, v1, v2, v3);
    v0 ^= b;
    v2 ^= 0xff;
    SIP_ROUND(v0, v1, v2, v3);
    SIP_ROUND(v0, v1, v2, v3);
    SIP_ROUND(v0, v1, v2, v3);
    return (v0 ^ v1) ^ (v2 ^ v3);
}

/* _Py_HashBytes's value for key. */
static inline uint64_t key_hash(const char *key, uint32_t length) {
    if (!hash_is_inlined) return (uint64_t)_Py_HashBytes(key, (Py_ssize_t)length);
    if (length == 0) return 0;
    uint64_t hash = siphash13(key, length);
    return hash == (uint64_t)-1 ? (uint64_t)-2 : hash;
}

/* Whether the inlined SipHash may stand in for _Py_HashBytes here: the interpreter
   uses siphash13 on every length (no small-string cutoff) with 64-bit hashes, and a
   sample of keys of every length up to 64 hashes the same both ways. */
static void choose_hash(void) {
    hash_is_inlined = 0;
#if Py_HASH_CUTOFF == 0 && SIZEOF_VOID_P == 8
    const PyHash_FuncDef *def = PyHash_GetFuncDef();
    if (def == NULL || strcmp(def->name, "siphash13") != 0 || def->hash_bits != 64) return;
    sip_k0 = _Py_HashSecret.siphash.k0;
    sip_k1 = _Py_HashSecret.siphash.k1;
    char sample[64];
    for (int i = 0; i < 64; i++) sample[i] = (char)(i * 37 + 11);
    for (uint32_t length = 0; length <= 64; length++) {
        for (uint32_t at = 0; at + length <= 64; at += 13) {
            hash_is_inlined = 1;
            uint64_t mine = key_hash(sample + at, length);
            hash_is_inlined = 0;
            if (mine != (uint64_t)_Py_HashBytes(sample + at, (Py_ssize_t)length)) return;
        }
    }
    hash_is_inlined = 1;
#endif
}

static int table_grow(KeyTable *table) {
    size_t capacity = (table->mask + 1) * 2;
    Entry *entries = calloc(capacity, sizeof(Entry));
    if (entries == NULL) return -1;
    int rehash = capacity - 1 > UINT32_MAX; /* the kept 32 bits no longer place an entry */
    for (size_t i = 0; i <= table->mask; i++) {
        const Entry *old = &table->entries[i];
        if (old->offset == 0) continue;
        uint64_t hash = rehash ? key_hash(entry_key(table, old), old->length) : old->hash;
        size_t slot = (size_t)hash & (capacity - 1);
        while (entries[slot].offset != 0) slot = (slot + 1) & (capacity - 1);
        entries[slot] = *old;
    }
    free(table->entries);
    table->entries = entries;
    table->mask = capacity - 1;
    table->grown++;
    return 0;
}

static inline void table_prefetch(const KeyTable *table, uint64_t hash) {
    __builtin_prefetch(&table->entries[(size_t)hash & table->mask]);
}

/* Count `n` occurrences of key (whose key_hash is `hash`); a new key only while the
   table holds fewer than `bound`. When ADDED, *slot_out is the key's slot (valid
   until the table next grows: see KeyTable.grown). */
static int table_add_at(KeyTable *table, const char *key, uint32_t length, uint64_t hash, size_t bound, uint64_t n,
                        size_t *slot_out) {
    size_t slot = (size_t)hash & table->mask;
    for (;;) {
        Entry *entry = &table->entries[slot];
        if (entry->offset == 0) break;
        if (entry->hash == (uint32_t)hash && entry->length == length &&
            keys_equal(entry_key(table, entry), key, length)) {
            entry_count_add(table, entry, n);
            *slot_out = slot;
            return ADDED;
        }
        slot = (slot + 1) & table->mask;
    }
    if (table->used >= bound) return LEFT_OUT;
    size_t record = COUNT_SIZE + length;
    if (table->arena_used + record > table->arena_capacity) {
        size_t capacity = table->arena_capacity ? table->arena_capacity * 2 : 4096;
        while (capacity < table->arena_used + record) capacity *= 2;
        char *arena = realloc(table->arena, capacity);
        if (arena == NULL) return OUT_OF_MEMORY;
        table->arena = arena;
        table->arena_capacity = capacity;
    }
    memcpy(table->arena + table->arena_used, &n, COUNT_SIZE);
    memcpy(table->arena + table->arena_used + COUNT_SIZE, key, length);
    Entry *entry = &table->entries[slot];
    entry->hash = (uint32_t)hash;
    entry->offset = table->arena_used;
    entry->length = length;
    table->arena_used += record;
    table->used++;
    *slot_out = slot;
    if (table->used * 2 > table->mask + 1 && table_grow(table) < 0) return OUT_OF_MEMORY;
    return ADDED;
}

static inline int table_add(KeyTable *table, const char *key, uint32_t length, uint64_t hash, size_t bound,
                            uint64_t n) {
    size_t slot;
    return table_add_at(table, key, length, hash, bound, n, &slot);
}

static inline int table_count(KeyTable *table, const char *key, uint32_t length, uint64_t hash, size_t bound) {
    return table_add(table, key, length, hash, bound, 1);
}

static PyObject *decode_key(const char *text, Py_ssize_t length) {
    return PyUnicode_DecodeUTF8(text, length, "surrogatepass");
}

#ifndef PROFILE_CACHE_SIZE
#define PROFILE_CACHE_SIZE 1024 /* a power of two */
#endif

typedef struct {
    PyObject_HEAD
    KeyTable profiles; /* key: device_type, app_version, locale, each as u32 length + bytes */
    KeyTable devices;
    KeyTable ips;
    size_t max_distinct;
    size_t max_profiles; /* SIZE_MAX: no bound (the pure twin's None) */
    unsigned long long message_count;
    unsigned long long missing_user_id, missing_device_id, missing_ip, missing_timestamp;
    int devices_capped, ips_capped, profiles_capped;
    char *scratch; /* a profile key being built */
    size_t scratch_capacity;
    /* A window has only tens or hundreds of distinct profiles, yet a profile key was
       built and SipHashed for every row. profile_cache[profile_cache_index(row)] is
       1 + the profiles slot of the profile last counted there (0: none), valid while
       profiles.grown == profile_cache_grown. A hit is always confirmed by comparing
       the key's bytes, so the cheap index is no weakness: crafted values that share
       an index only miss, and take the SipHash path as before. */
    uint64_t profile_cache_grown;
    uint32_t profile_cache[PROFILE_CACHE_SIZE];
} WindowTallies;

static int WindowTallies_init(WindowTallies *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"max_distinct", "max_profiles", NULL};
    Py_ssize_t max_distinct;
    PyObject *max_profiles = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|O:WindowTallies", keywords, &max_distinct, &max_profiles))
        return -1;
    if (max_profiles == Py_None) {
        self->max_profiles = SIZE_MAX;
    } else {
        Py_ssize_t bound = PyLong_AsSsize_t(max_profiles);
        if (bound == -1 && PyErr_Occurred()) return -1;
        self->max_profiles = bound < 0 ? 0 : (size_t)bound;
    }
    if (self->devices.entries != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WindowTallies initialised twice");
        return -1;
    }
    self->max_distinct = max_distinct < 0 ? 0 : (size_t)max_distinct;
    if (table_init(&self->profiles, 64) < 0 || table_init(&self->devices, 1024) < 0 ||
        table_init(&self->ips, 1024) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void WindowTallies_dealloc(WindowTallies *self) {
    table_free(&self->profiles);
    table_free(&self->devices);
    table_free(&self->ips);
    free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int profile_key(WindowTallies *self, const Row *row, uint32_t *length_out) {
    size_t length = 3 * sizeof(uint32_t);
    for (int k = K_DEVICE_TYPE; k <= K_LOCALE; k++) length += row->length[k];
    if (length > self->scratch_capacity) {
        char *scratch = realloc(self->scratch, length);
        if (scratch == NULL) return -1;
        self->scratch = scratch;
        self->scratch_capacity = length;
    }
    char *p = self->scratch;
    for (int k = K_DEVICE_TYPE; k <= K_LOCALE; k++) {
        memcpy(p, &row->length[k], sizeof(uint32_t));
        p += sizeof(uint32_t);
        if (row->length[k]) memcpy(p, row->text[k], row->length[k]);
        p += row->length[k];
    }
    *length_out = (uint32_t)length;
    return 0;
}

static inline uint32_t field_mix(const Row *row, int k) {
    uint32_t length = row->length[k];
    if (length == 0) return 0;
    const unsigned char *text = (const unsigned char *)row->text[k];
    return length ^ ((uint32_t)text[0] << 8) ^ ((uint32_t)text[length - 1] << 16) ^ ((uint32_t)text[length / 2] << 24);
}

/* Not a hash to rely on (see profile_cache): lengths and a few bytes of each field. */
static inline size_t profile_cache_index(const Row *row) {
    uint64_t h = field_mix(row, K_DEVICE_TYPE);
    h = h * 0x9E3779B97F4A7C15ULL ^ field_mix(row, K_APP_VERSION);
    h = h * 0x9E3779B97F4A7C15ULL ^ field_mix(row, K_LOCALE);
    h *= 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 40) & (PROFILE_CACHE_SIZE - 1);
}

/* Whether a profiles entry holds exactly the row's profile key (as profile_key builds it). */
static inline int profile_matches(const KeyTable *table, const Entry *entry, const Row *row) {
    size_t length = 3 * sizeof(uint32_t);
    for (int k = K_DEVICE_TYPE; k <= K_LOCALE; k++) length += row->length[k];
    if (entry->length != length) return 0;
    const char *p = entry_key(table, entry);
    for (int k = K_DEVICE_TYPE; k <= K_LOCALE; k++) {
        uint32_t field_length;
        memcpy(&field_length, p, sizeof(uint32_t));
        p += sizeof(uint32_t);
        if (field_length != row->length[k] || !keys_equal(p, row->text[k], field_length)) return 0;
        p += field_length;
    }
    return 1;
}

/* Count a row's profile: through the cache when it holds the profile, else as any key. */
static int count_profile(WindowTallies *self, const Row *row) {
    KeyTable *table = &self->profiles;
    if (self->profile_cache_grown != table->grown) {
        memset(self->profile_cache, 0, sizeof(self->profile_cache));
        self->profile_cache_grown = table->grown;
    }
    uint32_t *cached = &self->profile_cache[profile_cache_index(row)];
    if (*cached != 0) {
        Entry *entry = &table->entries[*cached - 1];
        if (profile_matches(table, entry, row)) {
            entry_count_add(table, entry, 1);
            return ADDED;
        }
    }
    uint32_t length;
    if (profile_key(self, row, &length) < 0) return OUT_OF_MEMORY;
    size_t slot;
    uint64_t grown = table->grown;
    int outcome = table_add_at(table, self->scratch, length, key_hash(self->scratch, length), self->max_profiles, 1,
                               &slot);
    if (outcome == ADDED && table->grown == grown && slot < UINT32_MAX) *cached = (uint32_t)slot + 1;
    return outcome;
}

/* Rows are counted in groups: first every key of the group is hashed and its slot
   prefetched, then counted. The device and IP tables of a busy window are larger
   than the CPU caches, and a lookup that waits for memory was most of the time. */
#define GROUP 16

static PyObject *WindowTallies_add(WindowTallies *self, PyObject *args) {
    LoginBatch *batch;
    long long low, high;
    if (!PyArg_ParseTuple(args, "O!LL:add", &LoginBatchType, &batch, &low, &high)) return NULL;
    if (self->devices.entries == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WindowTallies not initialised");
        return NULL;
    }
    if (!batch_is_complete(batch)) return NULL;
    Py_ssize_t added = 0;
    int failed = 0;
    size_t bound = self->max_distinct;
    /* The batch and this window are not touched by anyone else meanwhile: the
       aggregator's lock is held, and the batch keeps its texts alive. */
    Py_BEGIN_ALLOW_THREADS
    const Row *group[GROUP];
    uint64_t device_hashes[GROUP], ip_hashes[GROUP];
    Py_ssize_t next = 0;
    while (next < batch->count && !failed) {
        int size = 0;
        for (; next < batch->count && size < GROUP; next++) {
            const Row *row = &batch->rows[next];
            if (row->state != ROW_VALID || row->event_time < low || row->event_time >= high) continue;
            device_hashes[size] = key_hash(row->text[K_DEVICE_ID], row->length[K_DEVICE_ID]);
            ip_hashes[size] = key_hash(row->text[K_IP], row->length[K_IP]);
            table_prefetch(&self->devices, device_hashes[size]);
            table_prefetch(&self->ips, ip_hashes[size]);
            group[size++] = row;
        }
        for (int g = 0; g < size && !failed; g++) {
            const Row *row = group[g];
            added++;
            int outcome = count_profile(self, row);
            if (outcome == LEFT_OUT) self->profiles_capped = 1;
            if (row->length[K_DEVICE_ID] == 0) {
                self->missing_device_id++;
            } else if (outcome != OUT_OF_MEMORY) {
                int device = table_count(&self->devices, row->text[K_DEVICE_ID], row->length[K_DEVICE_ID],
                                         device_hashes[g], bound);
                if (device == LEFT_OUT) self->devices_capped = 1;
                if (device == OUT_OF_MEMORY) outcome = device;
            }
            if (row->length[K_IP] == 0) {
                self->missing_ip++;
            } else if (outcome != OUT_OF_MEMORY) {
                int ip = table_count(&self->ips, row->text[K_IP], row->length[K_IP], ip_hashes[g], bound);
                if (ip == LEFT_OUT) self->ips_capped = 1;
                if (ip == OUT_OF_MEMORY) outcome = ip;
            }
            failed = outcome == OUT_OF_MEMORY;
            self->missing_user_id += row->user_id_missing;
            self->missing_timestamp += row->timestamp_missing;
            self->message_count++;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    return PyLong_FromSsize_t(added);
}

static PyObject *WindowTallies_profile_counts(WindowTallies *self, PyObject *unused) {
    (void)unused;
    PyObject *result = PyDict_New();
    if (result == NULL) return NULL;
    const KeyTable *table = &self->profiles;
    for (size_t i = 0; i <= table->mask && table->entries; i++) {
        const Entry *entry = &table->entries[i];
        if (entry->offset == 0) continue;
        const char *p = entry_key(table, entry);
        PyObject *key = PyTuple_New(3);
        if (key == NULL) goto fail;
        for (int k = 0; k < 3; k++) {
            uint32_t length;
            memcpy(&length, p, sizeof(uint32_t));
            p += sizeof(uint32_t);
            PyObject *text = decode_key(p, length);
            p += length;
            if (text == NULL) {
                Py_DECREF(key);
                goto fail;
            }
            PyTuple_SET_ITEM(key, k, text);
        }
        PyObject *count = PyLong_FromUnsignedLongLong(entry_count(table, entry));
        int failed = count == NULL || PyDict_SetItem(result, key, count) < 0;
        Py_DECREF(key);
        Py_XDECREF(count);
        if (failed) goto fail;
    }
    return result;
fail:
    Py_DECREF(result);
    return NULL;
}

typedef struct {
    uint64_t count;
    const char *key;
    uint32_t length;
} Ranked;

/* Count descending, then key ascending: UTF-8 byte order is code point order, so
   this is the order Python gives the same strs. */
static int by_count_then_key(const void *a, const void *b) {
    const Ranked *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    uint32_t shorter = x->length < y->length ? x->length : y->length;
    int order = memcmp(x->key, y->key, shorter);
    if (order != 0) return order;
    return x->length < y->length ? -1 : x->length > y->length;
}

/* The n best IPs, best first. A window holds tens of thousands of IPs and TOP_IPS is
   small: one pass keeping the best n in a sorted array costs about a comparison per
   IP (a full sort took ~4.5 ms per 50,000-record window); a large n sorts them all. */
#define TOP_BY_INSERTION 64

static size_t rank_ips(const KeyTable *table, Ranked *ranked, size_t n) {
    size_t used = table->used;
    if (n >= used || n > TOP_BY_INSERTION) {
        size_t r = 0;
        for (size_t i = 0; i <= table->mask && table->entries; i++) {
            const Entry *entry = &table->entries[i];
            if (entry->offset == 0) continue;
            ranked[r++] = (Ranked){entry_count(table, entry), entry_key(table, entry), entry->length};
        }
        qsort(ranked, used, sizeof(Ranked), by_count_then_key);
        return n < used ? n : used;
    }
    size_t kept = 0;
    for (size_t i = 0; i <= table->mask && table->entries; i++) {
        const Entry *entry = &table->entries[i];
        if (entry->offset == 0) continue;
        Ranked candidate = {entry_count(table, entry), entry_key(table, entry), entry->length};
        if (kept == n && by_count_then_key(&candidate, &ranked[n - 1]) >= 0) continue;
        size_t at = kept < n ? kept++ : n - 1; /* the last place, freed or dropped */
        while (at > 0 && by_count_then_key(&candidate, &ranked[at - 1]) < 0) {
            ranked[at] = ranked[at - 1];
            at--;
        }
        ranked[at] = candidate;
    }
    return kept;
}

static PyObject *WindowTallies_top_ips(WindowTallies *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n <= 0) return PyList_New(0);
    const KeyTable *table = &self->ips;
    Ranked *ranked = PyMem_RawMalloc(sizeof(Ranked) * (table->used + 1));
    if (ranked == NULL) return PyErr_NoMemory();
    size_t take;
    Py_BEGIN_ALLOW_THREADS
    take = rank_ips(table, ranked, (size_t)n);
    Py_END_ALLOW_THREADS
    PyObject *result = PyList_New((Py_ssize_t)take);
    for (size_t i = 0; result != NULL && i < take; i++) {
        PyObject *item = Py_BuildValue("(NK)", decode_key(ranked[i].key, ranked[i].length),
                                       (unsigned long long)ranked[i].count);
        if (item == NULL) Py_CLEAR(result);
        else PyList_SET_ITEM(result, (Py_ssize_t)i, item);
    }
    PyMem_RawFree(ranked);
    return result;
}

static PyObject *table_keys(const KeyTable *table, int with_counts) {
    PyObject *result = with_counts ? PyDict_New() : PySet_New(NULL);
    if (result == NULL) return NULL;
    for (size_t i = 0; i <= table->mask && table->entries; i++) {
        const Entry *entry = &table->entries[i];
        if (entry->offset == 0) continue;
        PyObject *key = decode_key(entry_key(table, entry), entry->length);
        PyObject *count = key ? PyLong_FromUnsignedLongLong(entry_count(table, entry)) : NULL;
        int failed = count == NULL ||
                     (with_counts ? PyDict_SetItem(result, key, count) : PySet_Add(result, key)) < 0;
        Py_XDECREF(key);
        Py_XDECREF(count);
        if (failed) {
            Py_DECREF(result);
            return NULL;
        }
    }
    return result;
}

static PyObject *WindowTallies_device_ids(WindowTallies *self, PyObject *unused) {
    (void)unused;
    return table_keys(&self->devices, 0);
}

static PyObject *WindowTallies_ip_counts(WindowTallies *self, PyObject *unused) {
    (void)unused;
    return table_keys(&self->ips, 1);
}

static PyObject *WindowTallies_unique_device_count(WindowTallies *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromSize_t(self->devices.used);
}

static PyObject *WindowTallies_unique_ip_count(WindowTallies *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromSize_t(self->ips.used);
}

static PyObject *WindowTallies_missing_counts(WindowTallies *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("{sKsKsKsK}", "user_id", self->missing_user_id, "device_id", self->missing_device_id, "ip",
                         self->missing_ip, "timestamp", self->missing_timestamp);
}

static PyObject *WindowTallies_capped(WindowTallies *self, PyObject *unused) {
    (void)unused;
    PyObject *result = PySet_New(NULL);
    if (result == NULL) return NULL;
    /* The names of aggregator.PROFILE_FIELDS, the pure twin's (tests hold them equal). */
    const char *names[7] = {NULL};
    int n = 0;
    if (self->profiles_capped) {
        names[n++] = "device_counts";
        names[n++] = "locale_counts";
        names[n++] = "app_version_by_device";
        names[n++] = "missing_field_counts";
    }
    if (self->devices_capped) names[n++] = "unique_device_count";
    if (self->ips_capped) {
        names[n++] = "unique_ip_count";
        names[n++] = "top_ips";
    }
    for (int i = 0; i < n; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (name == NULL || PySet_Add(result, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(name);
    }
    return result;
}

static PyObject *WindowTallies_message_count(WindowTallies *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->message_count);
}

static PyGetSetDef WindowTallies_getset[] = {
    {"message_count", (getter)WindowTallies_message_count, NULL, "Records counted.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* A window's distinct values, packed for a part on the partials topic (merging/parts.py):
   device ids as [u16 length][bytes]..., IPs as [u16 length][bytes][u64 count]...,
   little-endian, in table order. Made and read here without the GIL and without a
   Python object per value; core.window_value.WindowTallies packs the same bytes. */
static void put_u16(char *p, uint32_t v) {
    p[0] = (char)(v & 0xff);
    p[1] = (char)((v >> 8) & 0xff);
}

static uint32_t get_u16(const unsigned char *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

static void put_u64(char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (char)((v >> (8 * i)) & 0xff);
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static PyObject *pack_table(const KeyTable *table, int with_counts) {
    size_t size = 0;
    for (size_t i = 0; i <= table->mask && table->entries; i++) {
        const Entry *entry = &table->entries[i];
        if (entry->offset == 0) continue;
        if (entry->length > 0xffff) {
            PyErr_SetString(PyExc_ValueError, "a value longer than 65535 bytes cannot be packed");
            return NULL;
        }
        size += 2 + entry->length + (with_counts ? 8 : 0);
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (result == NULL) return NULL;
    char *out = PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i <= table->mask && table->entries; i++) {
        const Entry *entry = &table->entries[i];
        if (entry->offset == 0) continue;
        put_u16(out, entry->length);
        memcpy(out + 2, entry_key(table, entry), entry->length);
        out += 2 + entry->length;
        if (with_counts) {
            put_u64(out, entry_count(table, entry));
            out += 8;
        }
    }
    Py_END_ALLOW_THREADS
    return result;
}

static PyObject *WindowTallies_pack_values(WindowTallies *self, PyObject *unused) {
    (void)unused;
    PyObject *devices = pack_table(&self->devices, 0);
    if (devices == NULL) return NULL;
    PyObject *ips = pack_table(&self->ips, 1);
    if (ips == NULL) {
        Py_DECREF(devices);
        return NULL;
    }
    return Py_BuildValue("(NN)", devices, ips);
}

/* Add packed values into a table: 0 done, -1 malformed, -2 out of memory. */
static int add_packed_table(KeyTable *table, const unsigned char *p, size_t size, int with_counts, size_t bound,
                            int *capped) {
    size_t at = 0;
    while (at < size) {
        if (size - at < 2) return -1;
        uint32_t length = get_u16(p + at);
        at += 2;
        if (length == 0 || size - at < length + (with_counts ? 8u : 0u)) return -1;
        const char *key = (const char *)p + at;
        at += length;
        uint64_t n = 1;
        if (with_counts) {
            n = get_u64(p + at);
            at += 8;
            if (n == 0) return -1;
        }
        int outcome = table_add(table, key, length, key_hash(key, length), bound, n);
        if (outcome == OUT_OF_MEMORY) return -2;
        if (outcome == LEFT_OUT) *capped = 1;
    }
    return 0;
}

static PyObject *WindowTallies_add_packed(WindowTallies *self, PyObject *args) {
    Py_buffer devices, ips;
    if (!PyArg_ParseTuple(args, "y*y*:add_packed", &devices, &ips)) return NULL;
    if (self->devices.entries == NULL) {
        PyBuffer_Release(&devices);
        PyBuffer_Release(&ips);
        PyErr_SetString(PyExc_RuntimeError, "WindowTallies not initialised");
        return NULL;
    }
    int failed, devices_capped = 0, ips_capped = 0;
    Py_BEGIN_ALLOW_THREADS
    failed = add_packed_table(&self->devices, devices.buf, (size_t)devices.len, 0, self->max_distinct, &devices_capped);
    if (failed == 0)
        failed = add_packed_table(&self->ips, ips.buf, (size_t)ips.len, 1, self->max_distinct, &ips_capped);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&devices);
    PyBuffer_Release(&ips);
    if (devices_capped) self->devices_capped = 1;
    if (ips_capped) self->ips_capped = 1;
    if (failed == -1) {
        PyErr_SetString(PyExc_ValueError, "malformed packed values");
        return NULL;
    }
    if (failed == -2) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef WindowTallies_methods[] = {
    {"pack_values", (PyCFunction)WindowTallies_pack_values, METH_NOARGS,
     "pack_values() -> (device ids, ip counts) packed for a part (see merging/parts.py)."},
    {"add_packed", (PyCFunction)WindowTallies_add_packed, METH_VARARGS,
     "add_packed(device_ids, ip_counts): union packed values into these tallies (bounded like add)."},
    {"add", (PyCFunction)WindowTallies_add, METH_VARARGS,
     "add(batch, low, high) -> rows counted: the batch's valid rows with low <= event time < high."},
    {"profile_counts", (PyCFunction)WindowTallies_profile_counts, METH_NOARGS,
     "{(device_type, app_version, locale): count}, \"\" for a missing value."},
    {"unique_device_count", (PyCFunction)WindowTallies_unique_device_count, METH_NOARGS, NULL},
    {"unique_ip_count", (PyCFunction)WindowTallies_unique_ip_count, METH_NOARGS, NULL},
    {"top_ips", (PyCFunction)WindowTallies_top_ips, METH_O,
     "top_ips(n) -> [(ip, count)], count descending then ip ascending."},
    {"missing_counts", (PyCFunction)WindowTallies_missing_counts, METH_NOARGS,
     "Missing user_id, device_id, ip and timestamp (the others are in profile_counts)."},
    {"capped", (PyCFunction)WindowTallies_capped, METH_NOARGS,
     "Output fields that are lower bounds: new values were left out past a bound."},
    {"device_ids", (PyCFunction)WindowTallies_device_ids, METH_NOARGS, "The distinct device ids (for tests)."},
    {"ip_counts", (PyCFunction)WindowTallies_ip_counts, METH_NOARGS, "{ip: count} (for tests)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WindowTalliesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_login_columns.WindowTallies",
    .tp_doc = "WindowTallies(max_distinct, max_profiles=None): one window's counts; the twin of core.window_value.WindowTallies.",
    .tp_basicsize = sizeof(WindowTallies),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)WindowTallies_init,
    .tp_dealloc = (destructor)WindowTallies_dealloc,
    .tp_methods = WindowTallies_methods,
    .tp_getset = WindowTallies_getset,
};

static PyMethodDef methods[] = {
    {"parse_batch", parse_batch, METH_VARARGS, parse_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_login_columns",
    "Record values -> parsed batches -> window tallies, without the GIL; see native/login_columns.c.",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__login_columns(void) {
    for (int c = 0x20; c <= 0x7E; c++) PLAIN[c] = c != '"' && c != '\\';
    choose_hash();
    if (PyType_Ready(&LoginBatchType) < 0 || PyType_Ready(&WindowTalliesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&LoginBatchType);
    Py_INCREF(&WindowTalliesType);
    if (PyModule_AddObject(m, "LoginBatch", (PyObject *)&LoginBatchType) < 0 ||
        PyModule_AddObject(m, "WindowTallies", (PyObject *)&WindowTalliesType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
