using System.Text.Json;
using System.Text.Json.Serialization;

namespace ActorVmm.Host.Control;

/// <summary>
/// Where running host processes announce their control address: one small JSON file per
/// process in a per-user directory ($XDG_RUNTIME_DIR/actorvmm, else /tmp/actorvmm-UID). `ctl`
/// reads it to find hosts; files of processes that are gone are ignored and cleaned up.
/// </summary>
public static class HostDirectory
{
    public sealed record Entry(int Pid, string Address, IReadOnlyList<string> Vms);

    public static string DefaultPath()
    {
        var runtime = Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR");
        return !string.IsNullOrEmpty(runtime) && Directory.Exists(runtime)
            ? Path.Combine(runtime, "actorvmm")
            : Path.Combine(Path.GetTempPath(), $"actorvmm-{Environment.UserName}");
    }

    /// <summary>
    /// Makes <paramref name="directory"/> exist, belong to this user and be closed to others (0700):
    /// it holds the cluster certificate and the announcements `ctl` trusts. One of this user's with
    /// wider permissions is narrowed; one that another user owns (made first in a shared /tmp, say) is
    /// refused.
    /// </summary>
    public static void EnsurePrivate(string directory)
    {
        const UnixFileMode ownerOnly = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute;
        if (!Directory.Exists(directory)) Directory.CreateDirectory(directory, ownerOnly);
        var status = FileStatus.Of(directory);
        if (status.Owner != FileStatus.CurrentUser)
            throw new ClusterSecurityException($"the host directory {directory} belongs to user {status.Owner}, not to this user ({FileStatus.CurrentUser}); give another with actorvmm.control.directory");
        if (status.Mode != ownerOnly) File.SetUnixFileMode(directory, ownerOnly);
    }

    /// <summary>Announces this process; dispose to withdraw.</summary>
    public static IDisposable Announce(string directory, string address, IReadOnlyList<string> vms)
    {
        EnsurePrivate(directory);
        var path = Path.Combine(directory, $"{Environment.ProcessId}.json");
        File.WriteAllText(path, JsonSerializer.Serialize(new Entry(Environment.ProcessId, address, vms), HostDirectoryJson.Default.Entry));
        return new Withdraw(path);
    }

    /// <summary>The hosts that announced themselves and whose process still exists.</summary>
    public static IReadOnlyList<Entry> Read(string directory)
    {
        if (!Directory.Exists(directory)) return [];
        var result = new List<Entry>();
        foreach (var file in Directory.EnumerateFiles(directory, "*.json"))
        {
            try
            {
                var entry = JsonSerializer.Deserialize(File.ReadAllText(file), HostDirectoryJson.Default.Entry);
                if (entry is null) continue;
                if (!Directory.Exists($"/proc/{entry.Pid}"))
                {
                    File.Delete(file); // a host that died without withdrawing
                    continue;
                }
                result.Add(entry);
            }
            catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
            {
                // A file being written or not ours: skip it.
            }
        }
        return result;
    }

    private sealed class Withdraw(string path) : IDisposable
    {
        public void Dispose()
        {
            try { File.Delete(path); }
            catch (IOException) { }
        }
    }
}

/// <summary>The directory's JSON, generated at build time: a host announces itself while its guest
/// starts, and reflection-based serialization would first build its converters at run time.</summary>
[JsonSerializable(typeof(HostDirectory.Entry))]
internal sealed partial class HostDirectoryJson : JsonSerializerContext;
