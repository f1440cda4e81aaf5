using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace ActorVmm.Host.Snapshot;

/// <summary>A snapshot that cannot be written or read as it is; the message names what is wrong.</summary>
public sealed class SnapshotException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// The manifest of a snapshot directory (<c>manifest.json</c>): what wrote it, which format
/// version, the VM, and every part with its length and SHA-256 (null for a part checked by length
/// only: guest memory, which a lazy restore must not read whole just to check it).
/// </summary>
public sealed record SnapshotManifest(
    string Format,
    int Version,
    DateTimeOffset Created,
    string VmName,
    IReadOnlyList<SnapshotPart> Parts)
{
    /// <summary>The format name every ActorVmm snapshot carries: anything else is foreign.</summary>
    public const string FormatName = "actorvmm-snapshot";

    /// <summary>The version this host writes and the only one it reads.</summary>
    public const int CurrentVersion = 1;
}

/// <summary>One file of a snapshot: <paramref name="Name"/> is what it holds (e.g. "vcpu-0"),
/// <paramref name="File"/> its file name in the directory.</summary>
public sealed record SnapshotPart(string Name, string File, long Length, string? Sha256);

/// <summary>
/// A snapshot on disk: a directory holding <c>manifest.json</c> and one file per part. Writing
/// puts the parts first and the manifest last (written to a temporary name, then renamed): a
/// directory without a manifest is no snapshot, so a write cut short is never taken for one.
/// Reading checks the whole manifest against the parts before anything is used, and refuses with
/// a <see cref="SnapshotException"/> that names what is wrong: a foreign or unreadable manifest,
/// another format version, a missing, truncated or changed part, a part named outside the directory.
/// </summary>
public sealed class SnapshotDirectory
{
    public const string ManifestFile = "manifest.json";

    private static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Converters = { new JsonStringEnumConverter() },
        IncludeFields = false,
    };

    private readonly Dictionary<string, SnapshotPart> _parts;

    private SnapshotDirectory(string path, SnapshotManifest manifest)
    {
        Path = path;
        Manifest = manifest;
        _parts = manifest.Parts.ToDictionary(p => p.Name);
    }

    public string Path { get; }
    public SnapshotManifest Manifest { get; }

    /// <summary>Starts a snapshot in <paramref name="path"/>, which must not exist or be empty.</summary>
    public static SnapshotWriter Create(string path, string vmName)
    {
        if (File.Exists(path)) throw new SnapshotException($"{path} is a file; a snapshot is a directory");
        if (Directory.Exists(path) && Directory.EnumerateFileSystemEntries(path).Any())
            throw new SnapshotException($"{path} is not empty; a snapshot is written to a new or empty directory");
        var created = !Directory.Exists(path);
        try
        {
            Directory.CreateDirectory(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new SnapshotException($"cannot create the snapshot directory {path}: {e.Message}", e);
        }
        return new SnapshotWriter(path, vmName, created);
    }

    /// <summary>Opens the snapshot in <paramref name="path"/> and checks every part against its manifest.</summary>
    public static SnapshotDirectory Open(string path)
    {
        if (!Directory.Exists(path)) throw new SnapshotException($"no snapshot at {path}: no such directory");
        var manifestPath = System.IO.Path.Combine(path, ManifestFile);
        if (!File.Exists(manifestPath))
            throw new SnapshotException($"{path} is not a snapshot: it has no {ManifestFile} (a snapshot whose writing was cut short has none)");
        SnapshotManifest? manifest;
        try
        {
            manifest = JsonSerializer.Deserialize<SnapshotManifest>(File.ReadAllText(manifestPath), Json);
        }
        catch (JsonException e)
        {
            throw new SnapshotException($"{manifestPath} is not a snapshot manifest: {e.Message}", e);
        }
        if (manifest is null || manifest.Format != SnapshotManifest.FormatName)
            throw new SnapshotException($"{manifestPath} is not an ActorVmm snapshot (format \"{manifest?.Format}\", expected \"{SnapshotManifest.FormatName}\")");
        if (manifest.Version != SnapshotManifest.CurrentVersion)
            throw new SnapshotException($"{path} is a snapshot of format version {manifest.Version}; this host reads version {SnapshotManifest.CurrentVersion} only");
        if (manifest.Parts is null || string.IsNullOrEmpty(manifest.VmName))
            throw new SnapshotException($"{manifestPath} names no VM or no parts");
        var seen = new HashSet<string>();
        foreach (var part in manifest.Parts)
        {
            if (part?.Name is null || !seen.Add(part.Name)) throw new SnapshotException($"{manifestPath} lists a part twice or without a name");
            Check(path, part);
        }
        return new SnapshotDirectory(path, manifest);
    }

    public bool Has(string part) => _parts.ContainsKey(part);

    /// <summary>The file of part <paramref name="name"/> (checked when the snapshot was opened).</summary>
    public string PathOf(string name) =>
        _parts.TryGetValue(name, out var part)
            ? System.IO.Path.Combine(Path, part.File)
            : throw new SnapshotException($"the snapshot at {Path} has no part \"{name}\"");

    public byte[] ReadBytes(string name) => File.ReadAllBytes(PathOf(name));

    /// <summary>Part <paramref name="name"/> as the JSON of a <typeparamref name="T"/>.</summary>
    public T ReadJson<T>(string name)
    {
        try
        {
            return JsonSerializer.Deserialize<T>(File.ReadAllBytes(PathOf(name)), Json)
                   ?? throw new SnapshotException($"part \"{name}\" of {Path} is empty");
        }
        catch (JsonException e)
        {
            throw new SnapshotException($"part \"{name}\" of {Path} is not a {typeof(T).Name}: {e.Message}", e);
        }
    }

    private static void Check(string dir, SnapshotPart part)
    {
        if (string.IsNullOrEmpty(part.File) || part.File != System.IO.Path.GetFileName(part.File) || part.File is "." or ".." ||
            part.File == ManifestFile)
            throw new SnapshotException($"part \"{part.Name}\" names the file \"{part.File}\", which is not a file of the snapshot directory");
        var file = new FileInfo(System.IO.Path.Combine(dir, part.File));
        if (!file.Exists) throw new SnapshotException($"part \"{part.Name}\" is missing: no file {file.FullName}");
        if (file.Length != part.Length)
            throw new SnapshotException($"part \"{part.Name}\" ({file.FullName}) is {file.Length} bytes, its manifest says {part.Length}: " +
                                        (file.Length < part.Length ? "truncated" : "changed"));
        if (part.Sha256 is { } expected && !string.Equals(Hash(file.FullName), expected, StringComparison.OrdinalIgnoreCase))
            throw new SnapshotException($"part \"{part.Name}\" ({file.FullName}) does not match its manifest's SHA-256: changed or damaged");
    }

    internal static string Hash(string file)
    {
        using var stream = File.OpenRead(file);
        return Convert.ToHexString(SHA256.HashData(stream));
    }

    internal static void WriteManifest(string dir, SnapshotManifest manifest)
    {
        var temporary = System.IO.Path.Combine(dir, ManifestFile + ".tmp");
        File.WriteAllBytes(temporary, JsonSerializer.SerializeToUtf8Bytes(manifest, Json));
        File.Move(temporary, System.IO.Path.Combine(dir, ManifestFile), overwrite: true);
    }

    internal static byte[] ToJson<T>(T value) => JsonSerializer.SerializeToUtf8Bytes(value, Json);
}

/// <summary>Writes the parts of a new snapshot, then its manifest (<see cref="Complete"/>).</summary>
public sealed class SnapshotWriter
{
    private readonly string _path;
    private readonly string _vmName;
    private readonly List<SnapshotPart> _parts = [];

    private readonly bool _createdDirectory;

    internal SnapshotWriter(string path, string vmName, bool createdDirectory)
    {
        _path = path;
        _vmName = vmName;
        _createdDirectory = createdDirectory;
    }

    /// <summary>
    /// Gives up a snapshot that cannot be completed: removes every file written for it (and the
    /// directory, if this writer created it), so nothing half-written is left behind. Best effort:
    /// a directory without a manifest is never taken for a snapshot anyway.
    /// </summary>
    public void Abandon()
    {
        foreach (var file in Directory.Exists(_path) ? Directory.EnumerateFiles(_path, "*.part").ToArray() : [])
        {
            try { File.Delete(file); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        }
        if (!_createdDirectory) return;
        try { Directory.Delete(_path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }

    public string Path => _path;

    /// <summary>Writes part <paramref name="name"/> (hashed) from <paramref name="bytes"/>.</summary>
    public void WriteBytes(string name, ReadOnlySpan<byte> bytes)
    {
        var file = FileFor(name);
        using (var stream = File.Create(System.IO.Path.Combine(_path, file))) stream.Write(bytes);
        _parts.Add(new SnapshotPart(name, file, bytes.Length, Convert.ToHexString(SHA256.HashData(bytes))));
    }

    /// <summary>Writes part <paramref name="name"/> as the JSON of <paramref name="value"/>.</summary>
    public void WriteJson<T>(string name, T value) => WriteBytes(name, SnapshotDirectory.ToJson(value));

    /// <summary>
    /// Adds a part whose file <paramref name="write"/> creates at the path it is given (guest memory,
    /// written sparse). It is checked by length only when read back: a lazy restore must not read it
    /// whole to check it.
    /// </summary>
    public void WriteFile(string name, Action<string> write)
    {
        var file = FileFor(name);
        var full = System.IO.Path.Combine(_path, file);
        write(full);
        _parts.Add(new SnapshotPart(name, file, new FileInfo(full).Length, null));
    }

    /// <summary>Where part <paramref name="name"/>'s file goes, for a writer elsewhere (the vmspace writes
    /// guest memory on its own thread); <see cref="AddWrittenFile"/> records it once written.</summary>
    public string PathFor(string name) => System.IO.Path.Combine(_path, FileFor(name));

    /// <summary>Records part <paramref name="name"/>, written at <see cref="PathFor"/>, checked by length
    /// only (as <see cref="WriteFile"/>'s parts).</summary>
    public void AddWrittenFile(string name)
    {
        var file = FileFor(name);
        var full = System.IO.Path.Combine(_path, file);
        if (!File.Exists(full)) throw new SnapshotException($"part \"{name}\" was not written: no file {full}");
        _parts.Add(new SnapshotPart(name, file, new FileInfo(full).Length, null));
    }

    /// <summary>Writes the manifest: from now on the directory is a snapshot.</summary>
    public SnapshotManifest Complete()
    {
        var manifest = new SnapshotManifest(SnapshotManifest.FormatName, SnapshotManifest.CurrentVersion, DateTimeOffset.UtcNow,
            _vmName, _parts.ToArray());
        SnapshotDirectory.WriteManifest(_path, manifest);
        return manifest;
    }

    private string FileFor(string name)
    {
        if (string.IsNullOrEmpty(name) || name.Any(c => !(char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.')) || name.StartsWith('.'))
            throw new ArgumentException($"a snapshot part's name is letters, digits, '-', '_' and '.', not \"{name}\"", nameof(name));
        if (_parts.Any(p => p.Name == name)) throw new ArgumentException($"part \"{name}\" was written already", nameof(name));
        return FileOf(name);
    }

    /// <summary>The file of a snapshot directory that holds part <paramref name="part"/>.</summary>
    public static string FileOf(string part) => part + ".part";
}
