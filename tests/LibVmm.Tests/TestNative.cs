using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary>libc calls only the tests make.</summary>
internal static unsafe partial class TestNative
{
    /// <summary><c>poll(NULL, 0, timeout)</c> is a plain interruptible sleep: it returns 0 after the
    /// timeout, or -1 with EINTR when a handled signal arrives (never restarted, SA_RESTART or not).</summary>
    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    public static partial int Poll(nint fds, nuint nfds, int timeoutMs);

    [LibraryImport("libc", EntryPoint = "__libc_current_sigrtmax")]
    public static partial int CurrentSigRtMax();

    /// <summary>One byte per page of [addr, addr+length): bit 0 set when the page is in memory
    /// (for a shmem mapping: when the file has that page at all).</summary>
    [LibraryImport("libc", EntryPoint = "mincore", SetLastError = true)]
    public static partial int Mincore(nint addr, nuint length, byte* vec);

    /// <summary>Pages of the mapping [addr, addr+length) that exist.</summary>
    public static long ResidentPages(nint addr, ulong length)
    {
        var pages = checked((int)(length / 4096));
        var vec = new byte[pages];
        fixed (byte* v = vec)
        {
            if (Mincore(addr, (nuint)length, v) != 0)
                throw new InvalidOperationException($"mincore failed: errno {Marshal.GetLastPInvokeError()}");
        }
        return vec.Count(b => (b & 1) != 0);
    }

    /// <summary>A field of /proc/self/status in bytes (for example "RssShmem").</summary>
    public static long StatusBytes(string field)
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
        {
            if (!line.StartsWith(field + ":", StringComparison.Ordinal)) continue;
            var kb = line[(field.Length + 1)..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries)[0];
            return long.Parse(kb) * 1024;
        }
        throw new InvalidOperationException($"/proc/self/status has no {field}");
    }
}
