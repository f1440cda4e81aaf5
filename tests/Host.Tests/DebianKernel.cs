using Xunit;

namespace ActorVmm.Host.Tests;

// Shared with tests/Integration.Tests (linked there).

/// <summary>The Debian kernel and busybox initramfs of the KVM box's cache (.ci/kvmbox/build.sh), if built.</summary>
public static class DebianKernel
{
    public static string CacheDirectory =>
        Environment.GetEnvironmentVariable("KVMBOX_CACHE_DIR") is { Length: > 0 } dir ? dir
        : Path.Combine(Environment.GetEnvironmentVariable("XDG_CACHE_HOME") is { Length: > 0 } xdg ? xdg
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache"), "actorvmm-kvmbox");

    public static string? Vmlinuz => Existing(Environment.GetEnvironmentVariable("ACTORVMM_LINUX_KERNEL")) ?? Existing(Path.Combine(CacheDirectory, "kernel", "vmlinuz"));
    public static string? Initrd => Existing(Environment.GetEnvironmentVariable("ACTORVMM_LINUX_INITRD")) ?? Existing(Path.Combine(CacheDirectory, "initrd.cpio.gz"));

    private static string? Existing(string? path) => path is { Length: > 0 } && File.Exists(path) ? path : null;
}

/// <summary>A fact that needs the Debian kernel of the KVM box's cache; skipped, with where it looked, when it is not there.</summary>
public sealed class DebianKernelFactAttribute : FactAttribute
{
    public DebianKernelFactAttribute()
    {
        if (DebianKernel.Vmlinuz is null)
            Skip = $"no Debian kernel at {Path.Combine(DebianKernel.CacheDirectory, "kernel", "vmlinuz")} (build it with .ci/kvmbox/build.sh, or set ACTORVMM_LINUX_KERNEL)";
    }
}
