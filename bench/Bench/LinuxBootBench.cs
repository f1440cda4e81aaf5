using System.Diagnostics;
using System.Globalization;

namespace ActorVmm.Bench;

/// <summary>
/// How long a Linux guest takes to boot under ActorVmm and under QEMU, in the same place and run:
/// the guest kit's Debian kernel (bzImage) and busybox initramfs (guest/build.sh), 256 MiB, on N
/// vcpus, its console on COM1. Each run is timed from just before the VMM's process starts to the
/// kernel's first console line ("Linux version") and to the init's marker line
/// (<c>ACTORVMM-INIT-OK</c>); the process is then killed. The VMMs take turns.
/// </summary>
/// <remarks>
/// QEMU boots the same files with KVM's in-kernel local APICs (its default). Inside CI's KVM box
/// (<c>ACTORVMM_KVM_BOX=1</c>) KVM's local APIC timer stops firing for a nested guest, so there
/// QEMU's kernel gets <c>noapictimer</c> (the PIT keeps time); ActorVmm is run both as it boots
/// by default (<c>lapic = emulated</c>: its vlapics' timers, no option needed) and with the same
/// command line as QEMU, so the two can be compared on equal terms.
/// </remarks>
internal static class LinuxBootBench
{
    private const string InitMarker = "ACTORVMM-INIT-OK";
    private const string Banner = "Linux version";
    private const string Memory = "256M";
    private static readonly TimeSpan Limit = TimeSpan.FromMinutes(10);

    private sealed record Vmm(string Name, string FileName, string[] Arguments);

    /// <summary>One boot; a run that did not get there within <see cref="Limit"/> has no time (null).</summary>
    private sealed record Run(double? BannerMs, double? InitMs);

    public static async Task<int> RunAsync(int runs, int cpus)
    {
        if (Prerequisites("linuxboot") is not var (host, kernel, initrd)) return 2;
        var box = Environment.GetEnvironmentVariable("ACTORVMM_KVM_BOX") == "1";
        const string append = "console=ttyS0 panic=-1";
        var qemuAppend = box ? append + " noapictimer" : append;
        var cpuCount = cpus.ToString(CultureInfo.InvariantCulture);

        string[] ActorVmm(string cmdline) =>
            ["run", "--kernel", kernel, "--initrd", initrd, "--append", cmdline, "--memory", Memory, "--cpus", cpuCount];
        var vmms = new List<Vmm> { new("actorvmm", host, ActorVmm(append)) };
        if (box) vmms.Add(new("actorvmm noapictimer", host, ActorVmm(qemuAppend)));
        if (StartupBench.OnPath("qemu-system-x86_64") is not { } qemu)
            Console.WriteLine("linuxboot: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86): ActorVmm alone");
        else
            foreach (var machine in new[] { "microvm", "pc" })
                vmms.Add(new($"qemu -M {machine}", qemu,
                [
                    "-accel", "kvm", "-cpu", "host", "-M", machine, "-smp", cpuCount, "-m", Memory, "-nodefaults", "-no-user-config",
                    "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", qemuAppend,
                ]));

        var results = vmms.ToDictionary(v => v, _ => new List<Run>());
        for (var i = 0; i < runs; i++)
            foreach (var vmm in vmms)
            {
                var run = await RunOnce(vmm);
                results[vmm].Add(run);
                Console.WriteLine($"  run {i + 1} {vmm.Name}: banner {Seconds(run.BannerMs)} s, init {Seconds(run.InitMs)} s");
            }

        Console.WriteLine($"linux boot: guest kit kernel ({Path.GetFileName(kernel)}) + initramfs, {Memory}, {cpus} vcpu(s), KVM{(box ? " (in the KVM box)" : "")}; " +
                          $"process start to the kernel's first line and to the init's marker, {runs} run(s) each, alternating");
        Console.WriteLine($"{"",-22}{"banner s",10}{"init s",10}");
        // A median over the runs that got there; none did: "-".
        double? Median(Vmm vmm, Func<Run, double?> what) =>
            results[vmm].Select(what).OfType<double>().ToList() is { Count: > 0 } times ? StartupBench.Median(times) : null;
        foreach (var vmm in vmms)
            Console.WriteLine($"{vmm.Name,-22}{Seconds(Median(vmm, r => r.BannerMs)),10}{Seconds(Median(vmm, r => r.InitMs)),10}");
        var qemus = vmms.Where(v => v.Name.StartsWith("qemu", StringComparison.Ordinal) && Median(v, r => r.InitMs) is not null).ToList();
        if (qemus.Count > 0)
        {
            var fastest = qemus.MinBy(v => Median(v, r => r.InitMs))!;
            var reference = Median(fastest, r => r.InitMs)!.Value;
            foreach (var ours in vmms.Where(v => !v.Name.StartsWith("qemu", StringComparison.Ordinal)))
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"{ours.Name} / {fastest.Name} (the faster QEMU), to the init marker: {Median(ours, r => r.InitMs) / reference:F2}   goal: <= 1.1"));
        }
        return 0;
    }

    private static async Task<Run> RunOnce(Vmm vmm)
    {
        double? banner = null, init = null;
        var guest = await GuestConsoleLines(vmm.FileName, vmm.Arguments, Limit, (line, ms) =>
        {
            if (banner is null && line.Contains(Banner, StringComparison.Ordinal)) banner = ms;
            if (!line.StartsWith(InitMarker, StringComparison.Ordinal)) return false;
            init = ms;
            return true;
        });
        if (banner is null || init is null)
            Console.WriteLine($"  {vmm.Name}: no {(banner is null ? "kernel banner" : "init marker")} within {Limit} ({guest.Ending})");
        return new Run(banner, init);
    }

    /// <summary>How a VMM process's run went: its exit code, its last console lines and its stderr, for a message.</summary>
    internal sealed record GuestConsole(int ExitCode, IReadOnlyList<string> Tail, string Stderr)
    {
        public string Ending => $"exit code {ExitCode}; its last lines:\n    {string.Join("\n    ", Tail.TakeLast(8))}\n    {Stderr.Trim()}";
    }

    /// <summary>
    /// Starts <paramref name="file"/> with <paramref name="arguments"/> and hands each line of its stdout (the
    /// guest's console) with the milliseconds since just before the start to <paramref name="line"/> until it
    /// answers true, the process ends or <paramref name="limit"/> passes; then the process is killed.
    /// </summary>
    internal static async Task<GuestConsole> GuestConsoleLines(string file, IEnumerable<string> arguments, TimeSpan limit, Func<string, double, bool> line)
    {
        var start = new ProcessStartInfo(file)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in arguments) start.ArgumentList.Add(a);
        var origin = Stopwatch.GetTimestamp();
        using var process = Process.Start(start)!;
        var stderr = process.StandardError.ReadToEndAsync();
        var tail = new Queue<string>();
        using var cts = new CancellationTokenSource(limit);
        try
        {
            while (await process.StandardOutput.ReadLineAsync(cts.Token) is { } text)
            {
                if (tail.Count == 20) tail.Dequeue();
                tail.Enqueue(text);
                if (line(text, Stopwatch.GetElapsedTime(origin).TotalMilliseconds)) break;
            }
        }
        catch (OperationCanceledException)
        {
        }
        finally
        {
            if (!process.HasExited) process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
        return new GuestConsole(process.ExitCode, [.. tail], await stderr);
    }

    private static string Seconds(double? ms) => ms is { } v ? (v / 1000).ToString("F1", CultureInfo.InvariantCulture) : "-";

    /// <summary>What a Linux guest bench needs: KVM, the host executable and the guest kit (ACTORVMM_GUEST_KIT,
    /// else guest/out). Null, with the reason on stderr, when one is missing.</summary>
    internal static (string Host, string Kernel, string Initrd)? Prerequisites(string bench)
    {
        if (!BenchGuest.KvmAvailable()) return null;
        if (StartupBench.HostExecutable() is not { } host)
        {
            Console.Error.WriteLine($"{bench}: the host executable (src/Host/bin/<configuration>/net10.0/actorvmm) is missing: build the solution first");
            return null;
        }
        var kit = Environment.GetEnvironmentVariable("ACTORVMM_GUEST_KIT") is { Length: > 0 } k ? k : Path.Combine(SourceTree(), "guest", "out");
        var kernel = Path.Combine(kit, "vmlinuz");
        var initrd = Path.Combine(kit, "initrd.img");
        if (!File.Exists(kernel) || !File.Exists(initrd))
        {
            Console.Error.WriteLine($"{bench}: no guest kit in {kit} (vmlinuz, initrd.img): build it with guest/build.sh, or set ACTORVMM_GUEST_KIT");
            return null;
        }
        return (host, kernel, initrd);
    }

    /// <summary>The source tree this bench was built in (the folder with ActorVmm.sln), else the current folder.</summary>
    internal static string SourceTree()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "ActorVmm.sln"))) return dir.FullName;
        return Directory.GetCurrentDirectory();
    }
}
