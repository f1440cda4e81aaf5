using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.RegularExpressions;
using Akka.Actor;
using Akka.Cluster;
using ActorVmm.Host;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Guests;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// Live migration of a 64 MiB guest that rewrites a window of its memory without pause (one word in
/// every page of the window, over and over), over loopback: ActorVmm between two host nodes in this
/// process (pre-copy, and stop-and-copy for scale), and QEMU between two processes (`-incoming`,
/// QMP `migrate`, `query-migrate`), in the same run, with the same boot sector and the same 300 ms
/// downtime limit. Each reports its own downtime and total time: ActorVmm from the guest's pause on the
/// source to its start on the target, QEMU its `downtime` and `total-time`.
/// </summary>
internal static partial class MigrationBench
{
    private const uint WindowBase = 0x10_0000; // 1 MiB: above the BIOS and the boot sector
    private const ushort Code32 = 0x7C80;      // the 32-bit part of the boot sector
    private const int GdtOffset = 0x1C0;
    private const int GdtrOffset = 0x1E0;
    private static readonly TimeSpan Downtime = TimeSpan.FromMilliseconds(300);

    public static async Task<int> RunAsync(int runs)
    {
        if (!File.Exists("/dev/kvm"))
        {
            Console.Error.WriteLine("actorvmm-bench migrate: needs /dev/kvm");
            return 1;
        }
        HostRunner.ConfigureLogging();
        var dir = Directory.CreateTempSubdirectory("actorvmm-bench-migrate-").FullName;
        var systems = new List<ActorSystem>();
        try
        {
            // Not a measure of failure detection: a pause no slow or emulated machine takes a live node for dead with.
            if (await BenchCluster.StartTwoAsync(dir, systems, ("actorvmm.cluster.failure-detector.acceptable-heartbeat-pause", "60s"),
                    ("actorvmm.cluster.split-brain-resolver.stable-after", "60s")) is null)
                return 1;
            var nodes = systems.Select(s => NodeProtocol.NodeName(Akka.Cluster.Cluster.Get(s).SelfAddress)).ToArray();
            await using var client = ControlClient.Create(TimeSpan.FromMinutes(2), dir);
            var qemu = StartupBench.OnPath("qemu-system-x86_64");

            Console.WriteLine($"live migration of a 64 MiB guest rewriting a window of its memory, over loopback, downtime limit {Downtime.TotalMilliseconds:0} ms; " +
                              $"median of {runs}");
            Console.WriteLine($"{"window",-8}{"vmm",-28}{"total ms",10}{"downtime ms",13}{"rounds",8}");
            var results = new List<(uint Window, string Vmm, double Total, double Down)>();
            foreach (var window in new uint[] { 1 << 20, 32 << 20 })
            {
                var sector = WindowWriter(window);
                var image = Path.Combine(dir, $"window-{window >> 20}M.img");
                await File.WriteAllBytesAsync(image, sector);
                foreach (var (name, stopAndCopy) in new[] { ("actorvmm pre-copy", false), ("actorvmm stop-and-copy", true) })
                {
                    var measured = new List<(double Total, double Down, int Rounds)>();
                    for (var r = 0; r < runs; r++)
                        measured.Add(await Ours(client, nodes, dir, image, $"w{window >> 20}-{r}-{(stopAndCopy ? "s" : "p")}", stopAndCopy));
                    Report(window, name, measured, results);
                }
                if (qemu is null) continue;
                var theirs = new List<(double Total, double Down, int Rounds)>();
                for (var r = 0; r < runs; r++)
                    if (await Qemu(qemu, dir, image) is { } q) theirs.Add(q);
                if (theirs.Count > 0) Report(window, "qemu pre-copy", theirs, results);
            }
            if (qemu is null) Console.WriteLine("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86): ActorVmm alone");
            foreach (var window in results.Select(x => x.Window).Distinct())
            {
                var ours = results.FirstOrDefault(x => x.Window == window && x.Vmm == "actorvmm pre-copy");
                var theirs = results.FirstOrDefault(x => x.Window == window && x.Vmm == "qemu pre-copy");
                if (ours.Vmm is null || theirs.Vmm is null || theirs.Down <= 0) continue;
                Console.WriteLine($"ratio {window >> 20} MiB window, actorvmm / qemu: downtime {ours.Down / theirs.Down:F2} (goal <= 1, and <= {Downtime.TotalMilliseconds:0} ms), " +
                                  $"total {ours.Total / theirs.Total:F2}");
            }
            return 0;
        }
        finally
        {
            foreach (var s in systems) await s.Terminate();
            try { Directory.Delete(dir, recursive: true); }
            catch (IOException) { }
        }
    }

    private static void Report(uint window, string vmm, List<(double Total, double Down, int Rounds)> measured,
        List<(uint, string, double, double)> results)
    {
        var total = Median(measured.Select(m => m.Total));
        var down = Median(measured.Select(m => m.Down));
        Console.WriteLine($"{$"{window >> 20} MiB",-8}{vmm,-28}{total,10:F0}{down,13:F0}{Median(measured.Select(m => (double)m.Rounds)),8:F0}");
        results.Add((window, vmm, total, down));
    }

    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted.Length == 0 ? double.NaN : sorted[sorted.Length / 2];
    }

    [GeneratedRegex(@"guest stopped (\d+) ms, (\d+) ms in all")]
    private static partial Regex Times();

    [GeneratedRegex(@"\((\d+) rounds?,")]
    private static partial Regex Rounds();

    /// <summary>Runs the guest on the first node, lets it write for a second, moves it to the second node and stops it there.</summary>
    private static async Task<(double Total, double Down, int Rounds)> Ours(ControlClient client, string[] nodes, string dir, string image, string name,
        bool stopAndCopy)
    {
        var serial = Path.Combine(dir, name + ".serial");
        await client.RunVmAsync(nodes[0], name,
        [
            new("actorvmm.vm.boot.flat", image), new("actorvmm.vm.memory", "64M"),
            new("actorvmm.vm.serial.output", serial), new("actorvmm.vm.serial.input", "none"),
        ], nodes[0]);
        await Running(() => File.Exists(serial) && File.ReadAllText(serial).Contains('R'), name);
        await Task.Delay(1000);
        var said = await client.MigrateAsync(await client.FindEntryAsync(name, [nodes[0]]), nodes[1], null, Downtime, stopAndCopy);
        Console.Error.WriteLine(said.TrimEnd());
        try { await client.StopAsync((await client.FindEntryAsync(name, [nodes[1]])).Actor); }
        catch (ControlException e) { Console.Error.WriteLine($"{name} not stopped after its move: {e.Message}"); } // measured already
        var times = Times().Match(said);
        if (!times.Success) throw new InvalidOperationException($"ctl migrate said: {said}");
        var rounds = Rounds().Match(said);
        return (double.Parse(times.Groups[2].Value, CultureInfo.InvariantCulture), double.Parse(times.Groups[1].Value, CultureInfo.InvariantCulture),
            rounds.Success ? int.Parse(rounds.Groups[1].Value, CultureInfo.InvariantCulture) : 0);
    }

    private static async Task Running(Func<bool> printed, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(2);
        while (!printed())
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"{what} did not start its writing within 2 minutes");
            await Task.Delay(20);
        }
    }

    /// <summary>QEMU migrating the same boot sector between two of its processes; null if it did not complete.</summary>
    private static async Task<(double Total, double Down, int Rounds)?> Qemu(string qemu, string dir, string image)
    {
        int FreePort()
        {
            using var l = new TcpListener(IPAddress.Loopback, 0);
            l.Start();
            return ((IPEndPoint)l.LocalEndpoint).Port;
        }
        var (qmpSource, qmpTarget, incoming) = (FreePort(), FreePort(), FreePort());
        var serial = Path.Combine(dir, $"qemu-{incoming}.serial");
        Process Start(int qmp, string serialFile, params string[] more)
        {
            var start = new ProcessStartInfo(qemu) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
            foreach (var a in new[]
                     {
                         "-machine", "pc,accel=kvm", "-m", "64", "-nodefaults", "-display", "none", "-serial", $"file:{serialFile}",
                         "-drive", $"file={image},format=raw,if=ide,snapshot=on", "-qmp", $"tcp:127.0.0.1:{qmp},server=on,wait=off",
                     }.Concat(more))
                start.ArgumentList.Add(a);
            return Process.Start(start)!;
        }
        using var target = Start(qmpTarget, serial + ".target", "-incoming", $"tcp:127.0.0.1:{incoming}");
        using var source = Start(qmpSource, serial);
        try
        {
            await Running(() => File.Exists(serial) && File.ReadAllText(serial).Contains('R'), "QEMU's guest");
            await Task.Delay(1000);
            using var qmp = await Qmp.ConnectAsync(qmpSource);
            await qmp.CommandAsync("migrate-set-parameters", new { downtime_limit = (int)Downtime.TotalMilliseconds });
            await qmp.CommandAsync("migrate", new { uri = $"tcp:127.0.0.1:{incoming}" });
            var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
            while (DateTime.UtcNow < deadline)
            {
                var info = await qmp.CommandAsync("query-migrate", null);
                var status = info.TryGetProperty("status", out var s) ? s.GetString() : null;
                if (status == "completed")
                    return (info.GetProperty("total-time").GetDouble(), info.GetProperty("downtime").GetDouble(),
                        info.TryGetProperty("ram", out var ram) && ram.TryGetProperty("dirty-sync-count", out var syncs) ? syncs.GetInt32() : 0);
                if (status is "failed" or "cancelled")
                {
                    Console.WriteLine($"qemu: the migration {status}: {info}");
                    return null;
                }
                await Task.Delay(20);
            }
            Console.WriteLine("qemu: the migration did not complete within 5 minutes");
            return null;
        }
        finally
        {
            foreach (var p in new[] { source, target })
                try { if (!p.HasExited) p.Kill(); }
                catch (InvalidOperationException) { }
        }
    }

    /// <summary>A QMP session (QEMU's qmp-spec.rst): the greeting, qmp_capabilities, then commands,
    /// one JSON object per line; asynchronous events in between are skipped.</summary>
    private sealed class Qmp : IDisposable
    {
        private readonly TcpClient _tcp;
        private readonly StreamReader _in;
        private readonly StreamWriter _out;

        private Qmp(TcpClient tcp)
        {
            _tcp = tcp;
            var stream = tcp.GetStream();
            _in = new StreamReader(stream);
            _out = new StreamWriter(stream) { AutoFlush = true, NewLine = "\n" };
        }

        public static async Task<Qmp> ConnectAsync(int port)
        {
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
            while (true)
            {
                var tcp = new TcpClient();
                try
                {
                    await tcp.ConnectAsync(IPAddress.Loopback, port);
                    var qmp = new Qmp(tcp);
                    await qmp._in.ReadLineAsync(); // {"QMP": {...}}
                    await qmp.CommandAsync("qmp_capabilities", null);
                    return qmp;
                }
                catch (SocketException) when (DateTime.UtcNow < deadline)
                {
                    tcp.Dispose();
                    await Task.Delay(100);
                }
            }
        }

        public async Task<JsonElement> CommandAsync(string command, object? arguments)
        {
            var options = new JsonSerializerOptions { PropertyNamingPolicy = new DashedNames() };
            await _out.WriteLineAsync(JsonSerializer.Serialize(arguments is null ? new { execute = command } : (object)new { execute = command, arguments }, options));
            while (await _in.ReadLineAsync() is { } line)
            {
                var reply = JsonDocument.Parse(line).RootElement;
                if (reply.TryGetProperty("return", out var value)) return value;
                if (reply.TryGetProperty("error", out var error)) throw new InvalidOperationException($"QMP {command}: {error}");
            }
            throw new IOException($"QMP closed during {command}");
        }

        public void Dispose() => _tcp.Dispose();

        /// <summary>QMP's argument names use dashes: downtime_limit → downtime-limit.</summary>
        private sealed class DashedNames : JsonNamingPolicy
        {
            public override string ConvertName(string name) => name.Replace('_', '-');
        }
    }

    /// <summary>
    /// A boot sector (loaded at 0x7C00 by a BIOS, or by <c>--flat</c>) that enables A20, enters 32-bit
    /// protected mode with flat segments (Intel SDM vol. 3A, 9.9.1), prints "R" on COM1, then writes the
    /// pass number into the first word of every page of [1 MiB, 1 MiB + <paramref name="window"/>),
    /// pass after pass, forever.
    /// </summary>
    internal static byte[] WindowWriter(uint window)
    {
        var a = new Assembler(16);
        a.cli();
        a.xor(ax, ax);
        a.mov(ds, ax);
        a.@in(al, 0x92);
        a.or(al, 2);                      // A20 on (port 0x92 bit 1); bit 0 would reset
        a.and(al, 0xFE);
        a.@out(0x92, al);
        a.lgdt(__[0x7C00 + GdtrOffset]);
        a.mov(eax, cr0);
        a.or(eax, 1);
        a.mov(cr0, eax);
        a.db(0x66, 0xEA);                 // jmp far 0x08:Code32 (32-bit offset)
        a.dd(Code32);
        a.dw(0x08);
        var part16 = GuestCode.Assemble(a, 0x7C00);

        var b = new Assembler(32);
        var outer = b.CreateLabel();
        var inner = b.CreateLabel();
        b.mov(ax, 0x10);
        b.mov(ds, ax);
        b.mov(es, ax);
        b.mov(ss, ax);
        b.mov(esp, 0x7000);
        b.mov(dx, 0x3F8);
        b.mov(al, (byte)'R');
        b.@out(dx, al);
        b.mov(al, (byte)'\n');
        b.@out(dx, al);
        b.xor(ebx, ebx);
        b.Label(ref outer);
        b.mov(edi, WindowBase);
        b.mov(ecx, window / 4096);
        b.Label(ref inner);
        b.mov(__dword_ptr[edi], ebx);
        b.add(edi, 4096);
        b.dec(ecx);
        b.jnz(inner);
        b.inc(ebx);
        b.jmp(outer);
        var part32 = GuestCode.Assemble(b, Code32);

        var sector = new byte[512];
        if (part16.Length > Code32 - 0x7C00 || Code32 - 0x7C00 + part32.Length > GdtOffset) throw new InvalidOperationException("the boot sector's code is too long");
        part16.CopyTo(sector, 0);
        part32.CopyTo(sector, Code32 - 0x7C00);
        // GDT: null, code (base 0, limit 4 GiB, 32-bit, execute/read), data (read/write).
        BitConverter.TryWriteBytes(sector.AsSpan(GdtOffset + 8), 0x00CF9A000000FFFFUL);
        BitConverter.TryWriteBytes(sector.AsSpan(GdtOffset + 16), 0x00CF92000000FFFFUL);
        BitConverter.TryWriteBytes(sector.AsSpan(GdtrOffset), (ushort)23);
        BitConverter.TryWriteBytes(sector.AsSpan(GdtrOffset + 2), 0x7C00u + GdtOffset);
        sector[510] = 0x55;
        sector[511] = 0xAA;
        return sector;
    }
}
