using System.Globalization;
using System.Reflection;
using Akka.Configuration;
using Akka.Configuration.Hocon;

namespace ActorVmm.Host.Config;

/// <summary>A configuration problem, stated so the user can fix it.</summary>
public sealed class ConfigException(string message) : Exception(message);

/// <summary>The settings of one VM, read from HOCON (defaults, then a VM file, then the command line).</summary>
public sealed record VmConfig(
    string Name, ulong MemoryBytes, int Cpus, string SerialOutput, string SerialInput, string? TracePath,
    double TimeoutSeconds, string? PerfettoPath = null, string TraceFilter = "", Vm.LapicMode Lapic = Vm.LapicMode.Emulated,
    ActorVmm.Memory.VmspaceOptions? Paging = null, bool TraceLive = false, bool Superpages = true, Vm.SharedMemorySpec? SharedMemory = null,
    bool TestDevices = false)
{
    /// <summary>actorvmm.vm.rng: a virtio entropy device at PCI 00:01.0.</summary>
    public bool Rng { get; init; }

    /// <summary>actorvmm.vm.disk: a virtio block device at PCI 00:02.0 backed by a host file; null: none.</summary>
    public Vm.DiskSpec? Disk { get; init; }

    /// <summary>actorvmm.vm.virtio-console: a virtio console at PCI 00:03.0 on the VM's console.</summary>
    public bool VirtioConsole { get; init; }

    /// <summary>actorvmm.vm.net: a virtio network card at PCI 00:04.0 on an existing TAP interface
    /// (<c>net = { tap = NAME, mac = "52:54:00:12:34:56" }</c>; the MAC defaults to <see cref="Vm.NetSpec.DefaultMac"/>).</summary>
    public Vm.NetSpec? Net { get; init; }

    /// <summary>actorvmm.vm.cpu: the CPUID features the vcpus see.</summary>
    public LibVmm.CpuModel Cpu { get; init; } = LibVmm.CpuModel.Host;

    /// <summary>actorvmm.vm.devices.NAME.node: devices that run on another host node (HOST:PORT), by name.</summary>
    public IReadOnlyDictionary<string, string> DeviceNodes { get; init; } = new SettingsMap();

    /// <summary>actorvmm.vm.checkpoint: checkpoints every <see cref="CheckpointSpec.Interval"/> into a
    /// shared directory, for failover (host nodes only); null: none.</summary>
    public CheckpointSpec? Checkpoint { get; init; }

    /// <summary>hocon/default.conf, embedded in the executable.</summary>
    public static string DefaultHocon()
    {
        using var s = Assembly.GetExecutingAssembly().GetManifestResourceStream("default.conf")
                      ?? throw new InvalidOperationException("default.conf is not embedded");
        using var r = new StreamReader(s);
        return r.ReadToEnd();
    }

    /// <summary>The defaults with <paramref name="vmFile"/> (if any) on top. Throws <see cref="ConfigException"/>.</summary>
    public static Akka.Configuration.Config Load(string? vmFile)
    {
        var defaults = ConfigurationFactory.ParseString(DefaultHocon());
        if (vmFile is null) return defaults;
        if (!File.Exists(vmFile)) throw new ConfigException($"config file {vmFile} does not exist");
        string text;
        try { text = File.ReadAllText(vmFile); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ConfigException($"config file {vmFile} cannot be read: {e.Message}");
        }
        Akka.Configuration.Config parsed;
        try
        {
            parsed = ConfigurationFactory.ParseString(text);
        }
        catch (Exception e)
        {
            throw new ConfigException($"config file {vmFile} is not valid HOCON: {FirstLine(e.Message)}");
        }
        // Akka's parser accepts a key with nothing after it at the end of the text ("memory = "),
        // which From() would then read as null: report the key instead.
        if (FirstKeyWithoutValue(parsed.Root, "") is { } key)
            throw new ConfigException($"config file {vmFile} is not valid HOCON: {key} has no value");
        return parsed.WithFallback(defaults);
    }

    private static string? FirstKeyWithoutValue(HoconValue? value, string path)
    {
        if (value is null) return null;
        if (value.Values.Count == 0) return path.Length == 0 ? null : path;
        if (!value.IsObject()) return null;
        foreach (var (k, v) in value.GetObject().Items)
            if (FirstKeyWithoutValue(v, path.Length == 0 ? k : $"{path}.{k}") is { } key) return key;
        return null;
    }

    /// <summary>Reads actorvmm.vm from a loaded configuration, validating every value.</summary>
    public static VmConfig From(Akka.Configuration.Config config)
    {
        try
        {
            var vm = config.GetConfig("actorvmm.vm") ?? throw new ConfigException("the configuration has no actorvmm.vm section");
            try { Vcpu.VcpuProtocol.HaltPoll(config); }
            catch (FormatException e) { throw new ConfigException(e.Message); }
            var name = vm.GetString("name", "vm0");
            if (string.IsNullOrWhiteSpace(name)) throw new ConfigException("actorvmm.vm.name is empty");
            var memory = ParseSize(vm.GetString("memory", "64M"), "actorvmm.vm.memory");
            var cpusText = vm.GetString("cpus", "1");
            if (!int.TryParse(cpusText, NumberStyles.None, CultureInfo.InvariantCulture, out var cpus) || cpus is < 1 or > 16)
                throw new ConfigException($"actorvmm.vm.cpus must be a number from 1 to 16, not \"{cpusText}\"");
            var output = vm.GetString("serial.output", "stdout");
            var input = vm.GetString("serial.input", "stdin");
            if (input is not ("stdin" or "none")) throw new ConfigException($"actorvmm.vm.serial.input must be stdin or none, not \"{input}\"");
            var trace = vm.GetString("trace", "");
            var timeoutText = vm.GetString("timeout", "0");
            if (!double.TryParse(timeoutText, NumberStyles.Float, CultureInfo.InvariantCulture, out var timeout) || timeout < 0)
                throw new ConfigException($"actorvmm.vm.timeout must be a number of seconds >= 0, not \"{timeoutText}\"");
            var perfetto = vm.GetString("perfetto", "");
            var filter = vm.GetString("trace-filter", "") ?? "";
            try { Tracing.TraceFilter.Parse(filter); }
            catch (FormatException e) { throw new ConfigException($"actorvmm.vm.trace-filter: {e.Message}"); }
            var lapicText = vm.GetString("lapic", "emulated");
            var lapic = lapicText switch
            {
                "emulated" => Vm.LapicMode.Emulated,
                "assisted" => Vm.LapicMode.Assisted,
                _ => throw new ConfigException($"actorvmm.vm.lapic must be emulated or assisted, not \"{lapicText}\""),
            };
            ActorVmm.Memory.VmspaceOptions? paging = null;
            var trackingText = vm.GetString("paging.dirty-tracking", "uffd-wp");
            if (!ActorVmm.Memory.DirtyTrackingNames.TryParse(trackingText, out var tracking))
                throw new ConfigException($"actorvmm.vm.paging.dirty-tracking must be uffd-wp, dirty-log or dirty-ring, not \"{trackingText}\"");
            var ringText = vm.GetString("paging.dirty-ring-entries", ActorVmm.Memory.VmspaceOptions.DefaultDirtyRingEntries.ToString(CultureInfo.InvariantCulture));
            if (!uint.TryParse(ringText, NumberStyles.None, CultureInfo.InvariantCulture, out var ringEntries) ||
                ringEntries < LibVmm.DirtyRing.MinEntries || (ringEntries & (ringEntries - 1)) != 0)
                throw new ConfigException($"actorvmm.vm.paging.dirty-ring-entries must be a power of two of at least {LibVmm.DirtyRing.MinEntries}, not \"{ringText}\"");
            if (vm.GetBoolean("paging.enabled", false))
            {
                var limitText = vm.GetString("paging.resident-limit", "0");
                var limit = limitText == "0" ? 0 : ParseSize(limitText, "actorvmm.vm.paging.resident-limit");
                var swap = vm.GetString("paging.swap-file", "");
                if (limit > 0 && string.IsNullOrEmpty(swap))
                    throw new ConfigException("actorvmm.vm.paging.resident-limit needs actorvmm.vm.paging.swap-file");
                var coldText = vm.GetString("paging.cold-scans", "2");
                if (!int.TryParse(coldText, NumberStyles.None, CultureInfo.InvariantCulture, out var coldScans) || coldScans is < 1 or > 255)
                    throw new ConfigException($"actorvmm.vm.paging.cold-scans must be a number from 1 to 255, not \"{coldText}\"");
                var interval = ParseInterval(vm.GetString("paging.scan-interval", "0"), "actorvmm.vm.paging.scan-interval");
                paging = ActorVmm.Memory.VmspaceOptions.Paged(string.IsNullOrEmpty(swap) ? null : swap, limit, coldScans,
                    string.IsNullOrEmpty(swap) ? TimeSpan.Zero : interval);
            }
            else if (tracking != ActorVmm.Memory.DirtyTracking.UffdWp)
                paging = ActorVmm.Memory.VmspaceOptions.Unpaged; // KVM's dirty tracking needs no userfaultfd
            if (paging is not null) paging = paging with { DirtyTracking = tracking, DirtyRingEntries = ringEntries };

            Vm.SharedMemorySpec? shm = null;
            var shmFile = vm.GetString("shm.file", "");
            var shmSizeText = vm.GetString("shm.size", "0");
            if (!string.IsNullOrEmpty(shmFile))
            {
                ulong? shmSize = shmSizeText == "0" ? null : ParseSize(shmSizeText, "actorvmm.vm.shm.size", minimum: 4096);
                if (shmSize > Devices.Platform.SharedMemoryMaxSize)
                    throw new ConfigException($"actorvmm.vm.shm.size: \"{shmSizeText}\" is larger than the shared-memory window ({Devices.Platform.SharedMemoryMaxSize >> 20}M)");
                if (paging is { Userfaultfd: true })
                    throw new ConfigException("actorvmm.vm.shm: a shared-memory (passthru-style) device wires all guest memory, " +
                                              "so actorvmm.vm.paging.enabled must be off (no demand paging, no swap)");
                shm = new Vm.SharedMemorySpec(shmFile, shmSize);
            }
            else if (shmSizeText != "0")
                throw new ConfigException("actorvmm.vm.shm.size is set but actorvmm.vm.shm.file is empty");
            var cpuText = vm.GetString("cpu", LibVmm.CpuModel.HostBase);
            LibVmm.CpuModel cpu;
            try { cpu = LibVmm.CpuModel.Parse(cpuText); }
            catch (FormatException e) { throw new ConfigException($"actorvmm.vm.cpu: {e.Message}"); }
            var testDevices = OnOff(vm, "test-devices");
            var rng = OnOff(vm, "rng");
            if (rng && paging is { Userfaultfd: true })
                throw new ConfigException("actorvmm.vm.rng: the virtio entropy device reads and writes guest memory itself, " +
                                          "so actorvmm.vm.paging.enabled must be off (no demand paging, no swap)");
            var diskPath = vm.GetString("disk.path", "");
            var diskReadOnly = OnOff(vm, "disk.read-only");
            if (string.IsNullOrEmpty(diskPath) && diskReadOnly)
                throw new ConfigException("actorvmm.vm.disk.read-only is on but actorvmm.vm.disk.path is empty");
            var disk = string.IsNullOrEmpty(diskPath) ? null : new Vm.DiskSpec(diskPath, diskReadOnly);
            if (disk is not null && paging is { Userfaultfd: true })
                throw new ConfigException("actorvmm.vm.disk: the virtio block device reads and writes guest memory itself, " +
                                          "so actorvmm.vm.paging.enabled must be off (no demand paging, no swap)");
            var virtioConsole = OnOff(vm, "virtio-console");
            if (virtioConsole && paging is { Userfaultfd: true })
                throw new ConfigException("actorvmm.vm.virtio-console: the virtio console reads and writes guest memory itself, " +
                                          "so actorvmm.vm.paging.enabled must be off (no demand paging, no swap)");
            var net = NetCard(vm, name);
            if (net is not null && paging is { Userfaultfd: true })
                throw new ConfigException("actorvmm.vm.net: the virtio network card reads and writes guest memory itself, " +
                                          "so actorvmm.vm.paging.enabled must be off (no demand paging, no swap)");
            return new VmConfig(name, memory, cpus, output, input, string.IsNullOrEmpty(trace) ? null : trace, timeout,
                string.IsNullOrEmpty(perfetto) ? null : perfetto, filter, lapic, paging, vm.GetBoolean("trace-live", false),
                vm.GetBoolean("paging.superpages", true), shm, testDevices)
            {
                Cpu = cpu, Rng = rng, Disk = disk, VirtioConsole = virtioConsole, Net = net, DeviceNodes = DeviceNodesOf(vm),
                Checkpoint = CheckpointOf(vm),
            };
        }
        catch (ConfigException) { throw; }
        catch (Exception e)
        {
            throw new ConfigException($"bad configuration: {FirstLine(e.Message)}");
        }
    }

    /// <summary>The devices that can run on another node than their VM, by name.</summary>
    public static readonly string[] HostableDevices = ["uart0"];

    /// <summary>actorvmm.vm.devices: <c>NAME { node = "HOST:PORT" }</c> for each device that runs on another
    /// host node (an empty node: beside the VM).</summary>
    private static CheckpointSpec? CheckpointOf(Akka.Configuration.Config vm)
    {
        var interval = ParseInterval(vm.GetString("checkpoint.interval", "0"), "actorvmm.vm.checkpoint.interval");
        var directory = vm.GetString("checkpoint.directory", "") ?? "";
        if (interval == TimeSpan.Zero) return null;
        if (directory.Length == 0 || !Path.IsPathFullyQualified(directory))
            throw new ConfigException($"actorvmm.vm.checkpoint.directory must be an absolute path (storage every node sees) when checkpoint.interval is set, not \"{directory}\"");
        return new CheckpointSpec(interval, directory);
    }

    private static SettingsMap DeviceNodesOf(Akka.Configuration.Config vm)
    {
        var nodes = new SettingsMap();
        if (!vm.HasPath("devices")) return nodes;
        var devices = vm.GetValue("devices");
        if (devices.IsEmpty) return nodes;
        if (!devices.IsObject()) throw new ConfigException("actorvmm.vm.devices must be an object: devices { uart0 { node = \"HOST:PORT\" } }");
        foreach (var (device, value) in devices.GetObject().Items)
        {
            if (!HostableDevices.Contains(device))
                throw new ConfigException($"actorvmm.vm.devices.{device}: no device named {device} can run on another node " +
                                          $"(these can: {string.Join(", ", HostableDevices)})");
            if (!value.IsObject())
                throw new ConfigException($"actorvmm.vm.devices.{device} must be an object: {device} {{ node = \"HOST:PORT\" }}");
            foreach (var (key, setting) in value.GetObject().Items)
            {
                if (key != "node") throw new ConfigException($"actorvmm.vm.devices.{device}.{key}: unknown setting (a device takes node = \"HOST:PORT\")");
                var node = setting.GetString() ?? "";
                if (node.Length == 0) continue;
                try { Cluster.HostNode.SeedAddress(node); }
                catch (ConfigException) { throw new ConfigException($"actorvmm.vm.devices.{device}.node: \"{node}\" is not HOST:PORT"); }
                nodes[device] = node;
            }
        }
        return nodes;
    }

    /// <summary>actorvmm.vm.net.tap and .mac: the network card, or null without a TAP name.</summary>
    private static Vm.NetSpec? NetCard(Akka.Configuration.Config vm, string vmName)
    {
        var tap = vm.GetString("net.tap", "") ?? "";
        var macText = vm.GetString("net.mac", "") ?? "";
        if (tap.Length == 0)
        {
            if (macText.Length > 0) throw new ConfigException("actorvmm.vm.net.mac is set but actorvmm.vm.net.tap is empty");
            return null;
        }
        if (LibVmm.TapDevice.NameProblem(tap) is { } problem) throw new ConfigException($"actorvmm.vm.net.tap: {problem}");
        if (tap.Contains('%')) throw new ConfigException($"actorvmm.vm.net.tap: \"{tap}\" is a name pattern, not an interface's name");
        if (macText.Length == 0) return new Vm.NetSpec(tap, Vm.NetSpec.DefaultMac(vmName));
        if (!Devices.Virtio.MacAddress.TryParse(macText, out var mac))
            throw new ConfigException($"actorvmm.vm.net.mac must be a MAC address like 52:54:00:12:34:56, not \"{macText}\"");
        if (mac.IsMulticast)
            throw new ConfigException($"actorvmm.vm.net.mac: {mac} is a multicast address (its first octet is odd), not a card's");
        return new Vm.NetSpec(tap, mac);
    }

    /// <summary>actorvmm.vm.<paramref name="key"/> as on/off (true/false, yes/no; off when absent).</summary>
    private static bool OnOff(Akka.Configuration.Config vm, string key)
    {
        var text = vm.GetString(key, "off");
        return text switch
        {
            "on" or "true" or "yes" => true,
            "off" or "false" or "no" => false,
            _ => throw new ConfigException($"actorvmm.vm.{key} must be on or off, not \"{text}\""),
        };
    }

    /// <summary>Parses "0" (off), "250ms", "2s", "1m" (at most a day). Throws <see cref="ConfigException"/>.</summary>
    public static TimeSpan ParseInterval(string text, string what)
    {
        var t = (text ?? "").Trim();
        if (t == "0") return TimeSpan.Zero;
        var units = new (string Suffix, double Ms)[] { ("ms", 1), ("s", 1000), ("m", 60_000) };
        foreach (var (suffix, ms) in units)
            if (t.EndsWith(suffix, StringComparison.Ordinal) &&
                double.TryParse(t[..^suffix.Length], NumberStyles.Float, CultureInfo.InvariantCulture, out var n) &&
                n > 0 && n * ms <= TimeSpan.FromDays(1).TotalMilliseconds && n * ms >= 1)
                return TimeSpan.FromMilliseconds(n * ms);
        throw new ConfigException($"{what} must be 0 (off) or a duration like 500ms, 2s or 1m (1 ms to a day), not \"{t}\"");
    }

    /// <summary>Parses "64M", "1G", "2048K", "1048576", "2MiB" (at least <paramref name="minimum"/>, 1M unless
    /// given, at most 1T). Throws <see cref="ConfigException"/>.</summary>
    public static ulong ParseSize(string text, string what, ulong minimum = 1UL << 20)
    {
        var t = (text ?? "").Trim(); // a HOCON key without a value reads as null
        ulong multiplier = 1;
        var units = new (string Suffix, ulong Factor)[]
        {
            ("KiB", 1UL << 10), ("MiB", 1UL << 20), ("GiB", 1UL << 30), ("K", 1UL << 10), ("M", 1UL << 20), ("G", 1UL << 30),
            ("k", 1UL << 10), ("m", 1UL << 20), ("g", 1UL << 30),
        };
        foreach (var (suffix, factor) in units)
        {
            if (!t.EndsWith(suffix, StringComparison.Ordinal)) continue;
            multiplier = factor;
            t = t[..^suffix.Length];
            break;
        }
        if (!ulong.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out var n) || n == 0)
            throw new ConfigException($"{what}: \"{text}\" is not a size (examples: 64M, 1G, 2048K)");
        var bytes = n * multiplier;
        if (bytes / multiplier != n) throw new ConfigException($"{what}: \"{text}\" is too large");
        if (bytes % 4096 != 0) throw new ConfigException($"{what}: \"{text}\" is not a multiple of 4 KiB");
        if (bytes < minimum)
            throw new ConfigException($"{what}: \"{text}\" is below the minimum of {(minimum >= 1UL << 20 ? $"{minimum >> 20}M" : $"{minimum >> 10}K")}");
        if (bytes > (1UL << 40)) throw new ConfigException($"{what}: \"{text}\" is above the maximum of 1T");
        return bytes;
    }

    private static string FirstLine(string s) => s.Split('\n')[0].Trim();
}

/// <summary>A VM's checkpoints: every <paramref name="Interval"/>, into <paramref name="Directory"/>/NAME.</summary>
public sealed record CheckpointSpec(TimeSpan Interval, string Directory);
