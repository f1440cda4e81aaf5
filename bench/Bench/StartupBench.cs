using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using ActorVmm.Host;
using ActorVmm.Host.Guests;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// How long a VMM takes to start, run a trivial guest and exit: the whole process, as a user, a
/// test or a CI job starts it. The guest is a 64 KiB flat firmware image whose reset vector
/// (F000:FFF0) writes one byte to COM1 and exits through the debug-exit port (0xF4); the same image
/// is run by `actorvmm run --firmware` and by QEMU as its -bios (KVM, -nodefaults, a 16550 on COM1,
/// isa-debug-exit at 0xF4), on both of QEMU's machines that can run it: microvm and pc. The runs
/// alternate, each timed from just before the process is started until its exit is seen; every run
/// must print the byte and exit with the guest's status.
///
/// The host reports its own milestones (<see cref="StartupTimes"/>) measured from the same instant,
/// so the bench also shows where ActorVmm's time goes.
/// </summary>
internal static class StartupBench
{
    private const byte Output = (byte)'A';
    private const ushort Com1 = 0x3F8;
    private const byte DebugExitPort = 0xF4;
    /// <summary>The guest writes 0 to the debug-exit port: both VMMs exit with (0 &lt;&lt; 1) | 1.</summary>
    private const int GuestExitCode = 1;
    private const int ImageSize = 64 * 1024; // QEMU takes a -bios of whole 64 KiB blocks
    private const string Memory = "64M";

    private sealed record Vmm(string Name, string FileName, string[] Arguments, bool ReportsMilestones);

    private sealed record Run(double Ms, IReadOnlyDictionary<string, double> Milestones);

    public static async Task<int> RunAsync(int runs)
    {
        if (!BenchGuest.KvmAvailable()) return 2;
        if (HostExecutable() is not { } host)
        {
            Console.Error.WriteLine("startup: the host executable (src/Host/bin/<configuration>/net10.0/actorvmm) is missing: build the solution first");
            return 2;
        }
        var dir = Directory.CreateTempSubdirectory("actorvmm-startup-");
        try
        {
            var image = Path.Combine(dir.FullName, "guest.bin");
            await File.WriteAllBytesAsync(image, Image());
            var vmms = new List<Vmm> { new("actorvmm run", host, ["run", "--firmware", image, "--memory", Memory], ReportsMilestones: true) };
            var qemu = OnPath("qemu-system-x86_64");
            if (qemu is null)
                Console.WriteLine("startup: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86): ActorVmm alone");
            else
                foreach (var machine in new[] { "microvm", "pc" })
                    vmms.Add(new($"qemu -M {machine}", qemu,
                    [
                        "-accel", "kvm", "-M", machine, "-nodefaults", "-no-user-config", "-display", "none", "-m", Memory,
                        "-serial", "stdio", "-device", $"isa-debug-exit,iobase=0x{DebugExitPort:x},iosize=1", "-bios", image,
                    ], ReportsMilestones: false));

            // One untimed run each: the first start after a build reads its files from disk.
            foreach (var vmm in vmms) await RunOnce(vmm);
            var results = vmms.ToDictionary(v => v, _ => new List<Run>());
            for (var i = 0; i < runs; i++)
                foreach (var vmm in vmms)
                    results[vmm].Add(await RunOnce(vmm));

            Console.WriteLine($"start-up: a guest that writes one byte to COM1 and exits through port 0x{DebugExitPort:X} (reset vector, " +
                              $"{ImageSize / 1024} KiB firmware, {Memory}, KVM); process start to exit, {runs} runs each, alternating");
            Console.WriteLine($"{"",-16}{"median ms",11}{"min ms",9}{"max ms",9}");
            foreach (var vmm in vmms)
            {
                var ms = results[vmm].Select(r => r.Ms).ToArray();
                Console.WriteLine($"{vmm.Name,-16}{Median(ms),11:F1}{ms.Min(),9:F1}{ms.Max(),9:F1}");
            }
            var actorvmm = results[vmms[0]];
            if (vmms.Count > 1)
            {
                var fastest = vmms.Skip(1).MinBy(v => Median(results[v].Select(r => r.Ms)))!;
                var ratio = Median(actorvmm.Select(r => r.Ms)) / Median(results[fastest].Select(r => r.Ms));
                var ratioMin = actorvmm.Min(r => r.Ms) / results[fastest].Min(r => r.Ms);
                Console.WriteLine($"actorvmm / {fastest.Name} (the faster QEMU): {ratio:F2} (medians), {ratioMin:F2} (minima)   goal: <= 2");
            }
            // Where ActorVmm's time goes: each milestone's median, in the order they came.
            var names = actorvmm.SelectMany(r => r.Milestones.Keys).Distinct()
                .Select(n => (Name: n, Median: Median(actorvmm.Where(r => r.Milestones.ContainsKey(n)).Select(r => r.Milestones[n]))))
                .OrderBy(m => m.Median).ToList();
            names.Add(("exit", Median(actorvmm.Select(r => r.Ms))));
            Console.WriteLine("actorvmm's milestones (medians, ms from the process start): " +
                              string.Join(", ", names.Select(m => string.Create(CultureInfo.InvariantCulture, $"{m.Name} {m.Median:F1}"))));
            return 0;
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    /// <summary>The firmware: F4 (hlt) everywhere but at the reset vector.</summary>
    internal static byte[] Image()
    {
        var a = new Assembler(16);
        a.mov(dx, Com1);
        a.mov(al, Output);
        a.@out(dx, al);
        a.mov(al, 0);
        a.@out(DebugExitPort, al);
        a.cli();
        a.hlt();
        const ulong resetVector = 0xFFFF_FFF0;
        var code = GuestCode.Assemble(a, resetVector);
        if (code.Length > 16) throw new InvalidOperationException($"the reset-vector code is {code.Length} bytes; 16 fit");
        var image = new byte[ImageSize];
        Array.Fill(image, (byte)0xF4);
        code.CopyTo(image, ImageSize - 16);
        return image;
    }

    private static async Task<Run> RunOnce(Vmm vmm)
    {
        var start = new ProcessStartInfo(vmm.FileName)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in vmm.Arguments) start.ArgumentList.Add(a);
        var origin = Stopwatch.GetTimestamp();
        if (vmm.ReportsMilestones) start.Environment[StartupTimes.Variable] = "@" + origin.ToString(CultureInfo.InvariantCulture);
        using var process = Process.Start(start)!;
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(10));
        await process.WaitForExitAsync(cts.Token);
        var ms = Stopwatch.GetElapsedTime(origin).TotalMilliseconds;
        var (output, errors) = (await stdout, await stderr);
        if (process.ExitCode != GuestExitCode || output != ((char)Output).ToString())
            throw new InvalidOperationException($"{vmm.Name}: exit code {process.ExitCode} (expected {GuestExitCode}), " +
                                                $"output \"{output}\" (expected \"{(char)Output}\")\n{errors}");
        return new Run(ms, vmm.ReportsMilestones ? Milestones(errors) : new Dictionary<string, double>());
    }

    /// <summary>The milestones of the host's "actorvmm: startup: NAME 12.3 ms, ..." line.</summary>
    internal static Dictionary<string, double> Milestones(string stderr)
    {
        var line = stderr.Split('\n').LastOrDefault(l => l.StartsWith(StartupTimes.LinePrefix, StringComparison.Ordinal))
                   ?? throw new InvalidOperationException($"the host wrote no start-up line:\n{stderr}");
        return Regex.Matches(line[StartupTimes.LinePrefix.Length..], @"([^,]+?) ([0-9.]+) ms")
            .ToDictionary(m => m.Groups[1].Value.Trim(), m => double.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture));
    }

    /// <summary>src/Host/bin/CONFIGURATION/net10.0/actorvmm of the tree this bench was built in
    /// (the same configuration), or null.</summary>
    internal static string? HostExecutable()
    {
        var bin = new DirectoryInfo(AppContext.BaseDirectory); // bench/Bench/bin/CONFIGURATION/net10.0/
        var configuration = bin.Parent?.Name;
        for (var dir = bin; dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "ActorVmm.sln")))
            {
                var host = Path.Combine(dir.FullName, "src", "Host", "bin", configuration ?? "Release", bin.Name, "actorvmm");
                return File.Exists(host) ? host : null;
            }
        return null;
    }

    internal static string? OnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
        .Select(d => Path.Combine(d, name)).FirstOrDefault(File.Exists);

    internal static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2;
    }
}
