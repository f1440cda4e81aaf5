using System.Diagnostics;
using System.Runtime.InteropServices;
using ActorVmm.LibVmm;

namespace ActorVmm.Testing;

/// <summary>
/// iproute2's <c>ip</c>, for tests that make network namespaces and TAP interfaces, and what such a
/// test needs: root (CAP_NET_ADMIN), /dev/net/tun and <c>ip</c> itself.
/// </summary>
internal static partial class IpTool
{
    /// <summary>The <c>ip</c> executable on the PATH (or in /usr/sbin, /sbin); null if there is none.</summary>
    public static readonly string? Path = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':')
        .Append("/usr/sbin").Append("/sbin")
        .Select(d => System.IO.Path.Combine(d.Length == 0 ? "." : d, "ip")).FirstOrDefault(File.Exists);

    [LibraryImport("libc", EntryPoint = "geteuid")]
    private static partial uint Geteuid();

    /// <summary>What this host lacks to make a network namespace with a TAP interface; null: nothing.</summary>
    public static string? Unavailability() =>
        Geteuid() != 0 ? "needs root (CAP_NET_ADMIN) to make a network namespace and a TAP interface"
        : !File.Exists(TapDevice.CloneDevice) ? $"{TapDevice.CloneDevice} does not exist (no tun module, or not in this container)"
        : Path is null ? "iproute2's ip is not on the PATH (Debian package iproute2)"
        : null;

    /// <summary>Runs <c>ip</c> with <paramref name="args"/>; throws with its stderr if it fails.</summary>
    public static string Run(params string[] args)
    {
        var psi = new ProcessStartInfo(Path ?? throw new InvalidOperationException("iproute2's ip is not on the PATH"))
            { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEnd();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != 0) throw new InvalidOperationException($"ip {string.Join(' ', args)} failed ({p.ExitCode}): {stderr}");
        return stdout;
    }
}
