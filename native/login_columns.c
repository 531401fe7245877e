/*
 * _login_columns: the processor's hot path, the step "record values -> columns".
 *
 * Why this exists: per record, Python's work (decode, take fields out, trim,
 * count) cost several microseconds, five times the raw consume rate's budget
 * (README, Performance). This module does the decode-and-trim part in C for the
 * shape nearly every record has, and leaves everything else to the exact
 * Python path in parsing.py.
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
 * malformed JSON, a value that is not an object) is *deferred*: its position
 * is returned and parsing.py decodes it with the exact rules. The tests hold
 * both paths to the same columns on generated input (tests/test_parsing.py).
 *
 * For accepted records the contract's rules are applied here:
 *   - string fields: trimmed (only ' ' can surround a printable-ASCII value);
 *     empty after trimming, longer than max_field_length, or not a string
 *     -> "" (missing); user_id only as "missing or not" (no aggregate reads
 *     its value), so no str is made for it;
 *   - timestamp: an integer -> that int; a string -> the str as sent (Python
 *     applies the numeric-string rule); null/true/false/absent -> None;
 *   - a key given twice: the last one counts (as msgspec and json.loads do).
 *
 * Low-cardinality fields (device_type, app_version, locale) are interned, and
 * so is their (device_type, app_version, locale) tuple (see interned_ascii and
 * interned_profile): counting them hashes each key once, not once per record.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
static Py_ssize_t FIELD_NAME_LENGTHS[N_FIELDS];

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

/* A string's body after its opening quote. Returns the closing quote, or NULL to defer. */
static inline const char *scan_plain_string(const char *p, const char *end) {
    while (p < end && PLAIN[(unsigned char)*p]) p++;
    return p < end && *p == '"' ? p : NULL;
}

static inline int field_of_key(const char *key, Py_ssize_t length) {
    for (int f = 0; f < N_FIELDS; f++) {
        if (FIELD_NAME_LENGTHS[f] == length && memcmp(FIELD_NAMES[f], key, (size_t)length) == 0) return f;
    }
    return -1;
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

/* Interning of the low-cardinality fields (device_type, app_version, locale): one
 * str object per distinct value, kept across calls in a small direct-mapped table
 * (a new value takes its slot over, so memory stays bounded). The aggregator's
 * counters then meet objects whose hash is cached and that compare by identity.
 * Measured, not guessed: interning device_id, ip and user_id as well (65,536-slot
 * tables) doubled the parse time on fresh batches (cache misses on the table and
 * on the old str outweigh the saved allocation) and did not speed up counting. */
typedef struct {
    unsigned long long hash;
    PyObject *str; /* owned, or NULL */
} InternSlot;

typedef struct {
    InternSlot *slots;
    size_t mask;
} InternTable;

static InternTable INTERNED[N_STRING_FIELDS];

static PyObject *new_ascii(const char *text, Py_ssize_t length) {
    PyObject *str = PyUnicode_New(length, 127);
    if (str != NULL) memcpy(PyUnicode_1BYTE_DATA(str), text, (size_t)length);
    return str;
}

static inline unsigned long long hash_bytes(const char *text, Py_ssize_t length) {
    unsigned long long hash = 14695981039346656037ull; /* FNV-1a */
    for (Py_ssize_t i = 0; i < length; i++) hash = (hash ^ (unsigned char)text[i]) * 1099511628211ull;
    return hash;
}

static PyObject *interned_ascii(InternTable *table, const char *text, Py_ssize_t length) {
    if (table->slots == NULL) return new_ascii(text, length); /* a high-cardinality field */
    unsigned long long hash = hash_bytes(text, length);
    InternSlot *slot = &table->slots[hash & table->mask];
    PyObject *str = slot->str;
    if (str != NULL && slot->hash == hash && PyUnicode_GET_LENGTH(str) == length &&
        memcmp(PyUnicode_1BYTE_DATA(str), text, (size_t)length) == 0) {
        Py_INCREF(str);
        return str;
    }
    str = new_ascii(text, length);
    if (str == NULL) return NULL;
    Py_INCREF(str);
    Py_XSETREF(slot->str, str);
    slot->hash = hash;
    return str;
}

static int make_intern_table(InternTable *table, size_t slots) {
    table->slots = PyMem_Calloc(slots, sizeof(InternSlot));
    table->mask = slots - 1;
    return table->slots == NULL ? -1 : 0;
}

/* One (device_type, app_version, locale) tuple per distinct combination, kept like
 * the strs above. The three items are interned strs, so a slot matches when its
 * tuple holds the very same objects (the tuple keeps them alive, so no other str
 * can take their address). The aggregator counts these tuples: one shared object
 * per key means its hash is computed once and comparisons are by identity. */
#define PROFILE_SLOTS 1024
static PyObject *PROFILES[PROFILE_SLOTS];

static PyObject *interned_profile(PyObject *device_type, PyObject *app_version, PyObject *locale) {
    size_t hash = ((size_t)device_type >> 4) * 31u * 31u + ((size_t)app_version >> 4) * 31u + ((size_t)locale >> 4);
    PyObject **slot = &PROFILES[hash % PROFILE_SLOTS];
    PyObject *profile = *slot;
    if (profile != NULL && PyTuple_GET_ITEM(profile, 0) == device_type && PyTuple_GET_ITEM(profile, 1) == app_version &&
        PyTuple_GET_ITEM(profile, 2) == locale) {
        Py_INCREF(profile);
        return profile;
    }
    profile = PyTuple_Pack(3, device_type, app_version, locale);
    if (profile == NULL) return NULL;
    Py_INCREF(profile);
    Py_XSETREF(*slot, profile);
    return profile;
}

static PyObject *EMPTY; /* "" : a missing string field */

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

static int string_is_missing(const FieldValue *value, Py_ssize_t max_length) {
    Py_ssize_t length;
    return trimmed_string(value, max_length, &length) == NULL;
}

static PyObject *string_column_value(const FieldValue *value, Py_ssize_t max_length, InternTable *table) {
    Py_ssize_t length;
    const char *text = trimmed_string(value, max_length, &length);
    if (text == NULL) {
        Py_INCREF(EMPTY);
        return EMPTY;
    }
    return interned_ascii(table, text, length);
}

/* Consecutive records mostly share their second: reuse the previous int object. */
static PyObject *timestamp_column_value(const FieldValue *value, PyObject **previous, long long *previous_value) {
    switch (value->kind) {
    case V_INTEGER:
        if (*previous == NULL || *previous_value != value->integer) {
            PyObject *number = PyLong_FromLongLong(value->integer);
            if (number == NULL) return NULL;
            Py_XSETREF(*previous, number);
            *previous_value = value->integer;
        }
        Py_INCREF(*previous);
        return *previous;
    case V_STRING:
        return new_ascii(value->text, value->length); /* as sent: Python trims and checks it */
    default:
        Py_RETURN_NONE;
    }
}

PyDoc_STRVAR(parse_values_doc,
             "parse_values(values, max_field_length) -> (columns, deferred)\n\n"
             "columns: user_id_missing (the rows whose user_id is missing: no aggregate\n"
             "reads its value), then 4 lists with one item per value: profile (a\n"
             "(device_type, app_version, locale) tuple), ip, device_id, timestamp.\n"
             "deferred: positions this parser left to the exact Python path; their items\n"
             "are None and they are not in user_id_missing.");

enum { C_USER_ID_MISSING, C_PROFILE, C_IP, C_DEVICE_ID, C_TIMESTAMP, N_COLUMNS };

static PyObject *parse_values(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *values;
    Py_ssize_t max_length;
    if (!PyArg_ParseTuple(args, "O!n:parse_values", &PyList_Type, &values, &max_length)) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(values);

    PyObject *columns[N_COLUMNS] = {NULL};
    PyObject *deferred = PyList_New(0);
    PyObject *result = NULL;
    PyObject *previous_timestamp = NULL;
    long long previous_timestamp_value = 0;
    if (deferred == NULL) goto done;
    for (int c = 0; c < N_COLUMNS; c++) {
        columns[c] = PyList_New(c == C_USER_ID_MISSING ? 0 : count);
        if (columns[c] == NULL) goto done;
    }

    FieldValue fields[N_FIELDS];
    for (Py_ssize_t row = 0; row < count; row++) {
        PyObject *item = PyList_GET_ITEM(values, row);
        int accepted = 0;
        if (PyBytes_Check(item)) {
            const char *start = PyBytes_AS_STRING(item);
            accepted = parse_record(start, start + PyBytes_GET_SIZE(item), fields);
        }
        if (!accepted) {
            PyObject *position = PyLong_FromSsize_t(row);
            if (position == NULL) goto done;
            int failed = PyList_Append(deferred, position);
            Py_DECREF(position);
            if (failed) goto done;
            for (int c = 0; c < N_COLUMNS; c++) {
                if (c == C_USER_ID_MISSING) continue;
                Py_INCREF(Py_None);
                PyList_SET_ITEM(columns[c], row, Py_None);
            }
            continue;
        }
        PyObject *strings[N_STRING_FIELDS] = {NULL};
        for (int f = 0; f < N_STRING_FIELDS; f++) {
            if (f == F_USER_ID) continue; /* only whether it is missing: see below */
            strings[f] = string_column_value(&fields[f], max_length, &INTERNED[f]);
            if (strings[f] == NULL) {
                for (int g = 0; g < f; g++) Py_XDECREF(strings[g]);
                goto done;
            }
        }
        if (string_is_missing(&fields[F_USER_ID], max_length)) {
            PyObject *position = PyLong_FromSsize_t(row);
            int failed = position == NULL || PyList_Append(columns[C_USER_ID_MISSING], position) < 0;
            Py_XDECREF(position);
            if (failed) {
                for (int f = 0; f < N_STRING_FIELDS; f++) Py_XDECREF(strings[f]);
                goto done;
            }
        }
        PyObject *profile = interned_profile(strings[F_DEVICE_TYPE], strings[F_APP_VERSION], strings[F_LOCALE]);
        Py_DECREF(strings[F_DEVICE_TYPE]);
        Py_DECREF(strings[F_APP_VERSION]);
        Py_DECREF(strings[F_LOCALE]);
        PyList_SET_ITEM(columns[C_IP], row, strings[F_IP]);
        PyList_SET_ITEM(columns[C_DEVICE_ID], row, strings[F_DEVICE_ID]);
        if (profile == NULL) goto done;
        PyList_SET_ITEM(columns[C_PROFILE], row, profile);
        PyObject *timestamp =
            timestamp_column_value(&fields[F_TIMESTAMP], &previous_timestamp, &previous_timestamp_value);
        if (timestamp == NULL) goto done;
        PyList_SET_ITEM(columns[C_TIMESTAMP], row, timestamp);
    }

    {
        PyObject *column_tuple = PyTuple_New(N_COLUMNS);
        if (column_tuple == NULL) goto done;
        for (int c = 0; c < N_COLUMNS; c++) {
            PyTuple_SET_ITEM(column_tuple, c, columns[c]);
            columns[c] = NULL;
        }
        result = Py_BuildValue("(NO)", column_tuple, deferred);
    }

done:
    /* On an error, lists may hold NULL items: PyList's dealloc skips them. */
    for (int c = 0; c < N_COLUMNS; c++) Py_XDECREF(columns[c]);
    Py_XDECREF(deferred);
    Py_XDECREF(previous_timestamp);
    return result;
}

static PyMethodDef methods[] = {
    {"parse_values", parse_values, METH_VARARGS, parse_values_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_login_columns",
    "Record values -> columns for the common record shape; see native/login_columns.c.",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__login_columns(void) {
    for (int f = 0; f < N_FIELDS; f++) FIELD_NAME_LENGTHS[f] = (Py_ssize_t)strlen(FIELD_NAMES[f]);
    for (int c = 0x20; c <= 0x7E; c++) PLAIN[c] = c != '"' && c != '\\';
    for (int f = 0; f < N_STRING_FIELDS; f++) {
        int low_cardinality = f == F_DEVICE_TYPE || f == F_APP_VERSION || f == F_LOCALE;
        if (low_cardinality && make_intern_table(&INTERNED[f], 1u << 10) < 0) return PyErr_NoMemory();
    }
    EMPTY = PyUnicode_New(0, 127);
    if (EMPTY == NULL) return NULL;
    return PyModule_Create(&module);
}
