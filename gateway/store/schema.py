"""The schema's history: one entry per version, applied in order by `Store._migrate`."""

# Each entry moves the schema one version up; never edit one that has shipped.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE apps (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        size TEXT NOT NULL DEFAULT 'standard-1x',
        run_counter INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        slug_sha256 TEXT NOT NULL,
        slug_size INTEGER NOT NULL,
        unpacked_size INTEGER NOT NULL,
        procfile TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (app_id, version)
    );
    CREATE TABLE config_vars (
        app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (app_id, key)
    );
    CREATE TABLE app_keys (
        app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        fingerprint TEXT NOT NULL,
        public_key TEXT NOT NULL,
        comment TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        PRIMARY KEY (app_id, fingerprint)
    );
    CREATE TABLE dynos (
        id INTEGER PRIMARY KEY,
        app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        command TEXT NOT NULL,
        size TEXT NOT NULL,
        release_version INTEGER NOT NULL,
        attached INTEGER NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        ended_at REAL,
        exit_status INTEGER,
        exit_signal TEXT,
        UNIQUE (app_id, name)
    );
    CREATE INDEX dynos_by_state ON dynos (state);
    """,
    """
    CREATE TABLE log_lines (
        id INTEGER PRIMARY KEY,
        app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        source TEXT NOT NULL,
        dyno TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX log_lines_by_app ON log_lines (app_id, id);
    """,
    """
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        apps TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE dynos ADD COLUMN pid INTEGER;
    ALTER TABLE dynos ADD COLUMN pid_started INTEGER;
    """,
]
