using Xunit;

namespace ActorVmm.Host.Tests;

// Shared with tests/Integration.Tests (linked there).

/// <summary>
/// The guest kit (guest/build.sh): the Debian cloud kernel as a bzImage (<c>vmlinuz</c>) and as an
/// ELF with its PVH note (<c>vmlinux</c>), and the busybox initramfs whose /init prints the
/// <see cref="InitMarker"/> line, checks the virtio disk and powers off. It lives in
/// <c>ACTORVMM_GUEST_KIT</c> if set, else in guest/out of the source tree these tests were built
/// from; `.ci/run` builds it before the tests.
/// </summary>
public static class GuestKit
{
    public const string Variable = "ACTORVMM_GUEST_KIT";

    /// <summary>The init's line once user space runs: "ACTORVMM-INIT-OK uptime=S cpus=N kernel=RELEASE".</summary>
    public const string InitMarker = "ACTORVMM-INIT-OK";
    /// <summary>The init's last line before it powers the machine off (ACPI S5).</summary>
    public const string DoneMarker = "ACTORVMM-INIT-DONE";

    public static string Directory =>
        Environment.GetEnvironmentVariable(Variable) is { Length: > 0 } dir ? dir
        : Path.Combine(SourceTree() ?? ".", "guest", "out");

    public static string? Vmlinuz => Existing("vmlinuz");
    public static string? Vmlinux => Existing("vmlinux");
    public static string? Initrd => Existing("initrd.img");

    /// <summary>Why the kit cannot be used, or null when all three files are there.</summary>
    public static string? Missing =>
        Vmlinuz is null || Vmlinux is null || Initrd is null
            ? $"the guest kit is not built: no vmlinuz, vmlinux and initrd.img in {Directory} (build it with guest/build.sh, or point {Variable} at one)"
            : null;

    private static string? Existing(string name) => Path.Combine(Directory, name) is var path && File.Exists(path) ? path : null;

    /// <summary>The nearest folder above the test assembly that holds ActorVmm.sln.</summary>
    private static string? SourceTree()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "ActorVmm.sln"))) return dir.FullName;
        return null;
    }
}

/// <summary>
/// A fact that needs the guest kit. Skipped, with where it looked, when the kit is not built;
/// under <c>ACTORVMM_REQUIRE_KVM=1</c> (CI) a missing kit is a failure instead, as a missing KVM is.
/// </summary>
public sealed class GuestKitFactAttribute : FactAttribute
{
    public GuestKitFactAttribute()
    {
        if (GuestKit.Missing is { } missing && Environment.GetEnvironmentVariable("ACTORVMM_REQUIRE_KVM") != "1") Skip = missing;
    }
}
