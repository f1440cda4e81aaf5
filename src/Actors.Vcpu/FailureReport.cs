using System.Text;
using ActorVmm.LibVmm;
using Iced.Intel;

namespace ActorVmm.Vcpu;

/// <summary>
/// The report a person reads when a vcpu cannot go on: which vcpu, why, CS:RIP, the bytes at RIP
/// and their disassembly. Built on the vcpu thread from the vcpu's own registers; every step is
/// best effort, so a broken guest still yields a report.
/// </summary>
public static class FailureReport
{
    public const int MaxInstructionBytes = 15;

    public static string Build(int vcpuId, VcpuProtocol.StopReason reason, VmExit exit, IVcpu vcpu, IGuestMemory? memory)
    {
        var sb = new StringBuilder();
        sb.Append($"vcpu {vcpuId} stopped: {Describe(reason, exit)}");
        try
        {
            var regs = RegisterState.From(vcpu.GetRegisters());
            var sregs = SpecialRegisterState.From(vcpu.GetSpecialRegisters());
            var bitness = sregs.CodeBitness;
            var linear = bitness == 64 ? regs.Rip : sregs.Cs.Base + regs.Rip;
            sb.Append($"; CS:RIP {sregs.Cs.Selector:X4}:{regs.Rip:X} (linear 0x{linear:X}, {bitness}-bit)");
            var bytes = ReadCode(vcpu, memory, sregs, linear);
            if (bytes.Length == 0)
            {
                sb.Append("; bytes at RIP: unreadable");
            }
            else
            {
                sb.Append("; bytes at RIP: ").Append(Convert.ToHexString(bytes).ToLowerInvariant());
                sb.Append("; disassembly: ").Append(Disassemble(bytes, regs.Rip, bitness));
            }
            sb.Append($"; RFLAGS 0x{regs.Rflags:X} CR0 0x{sregs.Cr0:X} CR3 0x{sregs.Cr3:X} CR4 0x{sregs.Cr4:X} EFER 0x{sregs.Efer:X}");
        }
        catch (Exception e)
        {
            sb.Append($"; registers unavailable ({e.Message})");
        }
        return sb.ToString();
    }

    public static string Describe(VcpuProtocol.StopReason reason, VmExit exit) => exit switch
    {
        VmExit.InternalError ie => $"KVM internal error: {ie.SuberrorName} (suberror {ie.Suberror})" +
                                   (ie.Data.Length > 0 ? $", data [{string.Join(' ', ie.Data.Select(d => $"0x{d:X}"))}]" : ""),
        VmExit.FailEntry fe => $"VM entry failed (hardware reason 0x{fe.HardwareReason:X}, cpu {fe.Cpu})",
        VmExit.Shutdown => "triple fault (KVM_EXIT_SHUTDOWN)",
        VmExit.SystemEvent se => $"system event {se.Type}",
        VmExit.Unknown u => $"unhandled exit reason {u.Reason}",
        _ => reason.ToString(),
    };

    /// <summary>Reads up to 15 bytes at the linear address, one page at a time.</summary>
    private static byte[] ReadCode(IVcpu vcpu, IGuestMemory? memory, SpecialRegisterState sregs, ulong linear)
    {
        if (memory is null) return [];
        var result = new List<byte>(MaxInstructionBytes);
        var address = linear;
        while (result.Count < MaxInstructionBytes)
        {
            GuestPhysAddr gpa;
            if ((sregs.Cr0 & SpecialRegisterState.Cr0Pg) == 0) gpa = new GuestPhysAddr(address & 0xFFFF_FFFF);
            else if (!vcpu.TryTranslate(address, out gpa)) break;
            var inPage = (int)Math.Min(4096 - (address & 0xFFF), (ulong)(MaxInstructionBytes - result.Count));
            var chunk = new byte[inPage];
            if (!memory.TryRead(gpa, chunk)) break;
            result.AddRange(chunk);
            address += (ulong)inPage;
        }
        return result.ToArray();
    }

    /// <summary>The first instruction in <paramref name="code"/> in NASM syntax.</summary>
    public static string Disassemble(byte[] code, ulong ip, int bitness)
    {
        var decoder = Iced.Intel.Decoder.Create(bitness, new ByteArrayCodeReader(code));
        decoder.IP = ip;
        decoder.Decode(out var instruction);
        if (instruction.IsInvalid) return "(invalid instruction)";
        var formatter = new NasmFormatter();
        var output = new StringOutput();
        formatter.Format(instruction, output);
        return output.ToStringAndReset();
    }
}
